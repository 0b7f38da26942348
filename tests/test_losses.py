"""dali_ipmix/losses.py: the JSD consistency loss against a direct NumPy computation."""
import numpy as np
import pytest
import torch

from dali_ipmix.losses import ipmix_loss, jsd_loss


def test_jsd_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=g) * 3 for _ in range(3)]
    labels = torch.tensor([0, 3, 6, 2, 2])
    got = jsd_loss(*logits, labels, weight=12.0)
    p = [np.exp(l.double().numpy()) / np.exp(l.double().numpy()).sum(1, keepdims=True) for l in logits]
    m = np.clip(sum(p) / 3, 1e-7, 1)
    kl = [np.sum(q * (np.log(q) - np.log(m))) / 5 for q in p]
    ce = -np.mean(np.log(p[0][np.arange(5), labels.numpy()]))
    assert got.item() == pytest.approx(ce + 12 * sum(kl) / 3, rel=1e-5)
    # sample-major views [B * 3]: (clean, aug1, aug2) of sample 0, then sample 1, ...
    flat = torch.stack(logits, 1).reshape(15, 7)
    loss, clean = ipmix_loss(flat, labels, 3, jsd_weight=12.0)
    assert loss.item() == pytest.approx(got.item(), rel=1e-6)
    torch.testing.assert_close(clean, logits[0])
    assert jsd_loss(logits[0], logits[0], logits[0], labels).item() == pytest.approx(ce, rel=1e-5)
