"""``dali-ipmix bench``: the contenders side by side in one run; table, JSON and plot."""
from __future__ import annotations

import argparse
import os
import sys

from dali_ipmix.helpformat import HelpFormatter
from dali_ipmix.training.precision import AMP_MODES

DEFAULT_CONTENDERS = "official,reference,dali-read,dali-plain,dali-ipmix,kernel,train,synthetic"
MIN_GEN_SIZE = 16    # generated pictures smaller than this measure nothing a user has


def _int_list(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, e.g. 1,2; got {text!r}")
    return values


def _names(text: str):
    return [v.strip() for v in text.split(",") if v.strip()]


def command_line(args: argparse.Namespace, actions) -> list:
    """The effective command, every option spelled out (what bench.json records as ``command``):
    ``dali-ipmix bench`` may be run through ``main(argv)`` (tests, scripts), where ``sys.argv``
    is someone else's command line."""
    words = ["dali-ipmix", "bench"]
    for action in actions:
        value = getattr(args, action.dest)
        if action.nargs == 0:                    # a switch
            words += [action.option_strings[0]] if value else []
        elif value is not None:
            words += [action.option_strings[0],
                      ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return words


def _run(args: argparse.Namespace) -> int:
    from dali_ipmix.bench.report import caption, check_out_dir, table, write_outputs
    from dali_ipmix.bench.runner import run_bench
    from dali_ipmix.errors import UserError
    if not 0 <= args.hw_decoder_load <= 1:      # NaN fails too
        raise UserError(f"--hw-decoder-load must be a share in [0, 1], got {args.hw_decoder_load}")
    if args.gen_size is not None and args.gen_size < MIN_GEN_SIZE:
        raise UserError(f"--gen-size must be >= {MIN_GEN_SIZE} px, got {args.gen_size}")
    on_row = None
    if args.out:
        check_out_dir(args.out, args.overwrite)
        # the rows so far, after every measurement: a run that is cut short still reports
        on_row = lambda partial: write_outputs(partial, args.out, plot=False)  # noqa: E731
    result = run_bench(
        data=args.data, mixing=args.mixing, contenders=args.contenders, threads=args.threads,
        batch_size=args.batch_size, image_size=args.image_size, warmup=args.warmup,
        iters=args.iters, min_seconds=args.min_seconds, repeats=args.repeats,
        device=args.device, backend=args.backend,
        hw_decoder_load=args.hw_decoder_load, arch=args.arch, amp=args.amp,
        channels_last=args.channels_last, gen_images=args.gen_images,
        gen_pictures=args.gen_pictures, gen_size=args.gen_size, gen_classes=args.gen_classes,
        seed=args.seed, data_filelist=args.data_filelist, mixing_filelist=args.mixing_filelist,
        workers=args.workers, official=args.official, command=command_line(args, args.options),
        log=lambda msg: print(msg, file=sys.stderr, flush=True), on_row=on_row)
    print(caption(result))
    print(table(result["rows"]))
    failed = []
    if args.out:
        paths, failed = write_outputs(result, args.out)
        if paths:
            print("wrote " + ", ".join(str(p) for p in paths))
        for what in failed:
            print(f"dali-ipmix bench: warning: could not write {what}; the table above holds the "
                  f"results", file=sys.stderr)
    if any(r["error"] for r in result["rows"]):
        print("dali-ipmix bench: some rows failed (see the 'error' lines); the others were measured",
              file=sys.stderr)
        return 1
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="throughput of the IPMix loaders and training, side by side in one run",
        description="Measure, in one process and on the same files, source images per second of: "
                    "official (the official IPMix code's own DataLoader, from --official DIR), "
                    "reference (this package's NumPy/PIL IPMix in a DataLoader), dali-read (the "
                    "training data's reader alone, nothing decoded: what the storage delivers), "
                    "dali-plain (the "
                    "DALI pipeline without IPMix), dali-draws (dali-tapes / dali-uniforms: the "
                    "pipeline making the random draws, decoded in the graph or raw, with no pixel "
                    "work), dali-ipmix / dali-ipmix-jsd (the DALI IPMix pipeline, one view / the "
                    "JSD triple), kernel / kernel-jsd (the fused backend alone on the device), "
                    "train (pipeline + training step) and synthetic (training step on random device "
                    "data).  Ratios are taken against the official rows when measured, else the "
                    "reference rows.  Prints a table; with --out also writes bench.json, bench.txt "
                    "and bench.png.",
        formatter_class=HelpFormatter)
    actions = []

    def add(group, *flags, **kw):
        actions.append(group.add_argument(*flags, **kw))

    g = p.add_argument_group("what to measure")
    add(g, "--contenders", type=_names, default=DEFAULT_CONTENDERS,
        help="comma-separated contenders (official, reference, dali-read, dali-plain, dali-draws, "
        "dali-ipmix, "
        "kernel, train, synthetic) or single rows (reference-jsd, dali-ipmix-jsd, ...); official "
        "is skipped without --official")
    add(g, "--threads", type=_int_list, default=str(os.cpu_count() or 1),
        help="DALI threads to sweep, e.g. 8,16 (and torch's intra-op threads on --device cpu); "
        "on GPU the rows on torch's threads (kernel, synthetic) run once")
    add(g, "--workers", type=_int_list, default=None,
        help="DataLoader worker processes to sweep for the official and reference rows "
        "(default: --threads)")
    add(g, "--official", default=None, metavar="DIR",
        help="a checkout of the official IPMix code (github.com/hzlsaber/IPMix): adds the official "
        "rows, and the ratios are taken against them; needs --image-size 224")
    add(g, "--device", choices=("auto", "cpu", "gpu"), default="auto",
        help="where DALI and the model run (auto: gpu if usable)")
    add(g, "--backend", choices=("fused", "dali"), default="fused",
        help="IPMix backend of the dali-ipmix and train rows")
    add(g, "--hw-decoder-load", type=float, default=0.65,
        help="share of JPEG decoding on the hardware decoder (GPU only)")
    add(g, "--batch-size", "-b", type=int, default=32, help="source images per batch")
    add(g, "--image-size", type=int, default=224, help="crop size (px)")
    add(g, "--warmup", type=int, default=3, help="untimed batches first (plus the prefetch queue)")
    add(g, "--iters", type=int, default=None,
        help="timed batches a row, at least (DataLoader rows: whole rounds of their workers); "
        "default 50 on GPU, 10 on the CPU")
    add(g, "--min-seconds", type=float, default=None,
        help="a row's timed window lasts at least this long (more batches if needed); "
        "default 2 on GPU, 0 on the CPU")
    add(g, "--repeats", type=int, default=None,
        help="times the whole sequence of rows is measured, interleaved; the table shows the "
        "median and min-max; default 3 on GPU, 1 on the CPU")
    add(g, "--arch", default="resnet50", help="torchvision model of the train/synthetic rows")
    add(g, "--amp", choices=AMP_MODES, default="auto",
        help="mixed precision of the training step (auto: bf16 on GPU, off on CPU)")
    add(g, "--channels-last", action="store_true", help="channels_last model and images")
    add(g, "--seed", type=int, default=0)

    g = p.add_argument_group("images (all contenders read the same files)")
    add(g, "--data", default=None, metavar="DIR",
        help="class-folder image set (DIR/<class>/<image>), a shard set (`dali-ipmix shard`) or "
        "s3://bucket/prefix of either (DALI rows only); default: generated JPEGs")
    add(g, "--mixing", default=None, metavar="DIR",
        help="mixing pictures (e.g. from `dali-ipmix fractals`); default: generated JPEGs")
    add(g, "--data-filelist", default=None, metavar="FILE",
        help="read only the --data files listed (`dali-ipmix verify DIR --write-filelist FILE` "
        "leaves bad files out)")
    add(g, "--mixing-filelist", default=None, metavar="FILE",
        help="read only the --mixing pictures listed (`dali-ipmix verify DIR --mixing "
        "--write-filelist FILE`)")
    add(g, "--gen-images", type=int, default=256, help="generated source images")
    add(g, "--gen-pictures", type=int, default=64, help="generated mixing pictures")
    add(g, "--gen-size", type=int, default=None,
        help="generated source height and mixing picture side in px "
        "(default round(image_size * 256 / 224)); sources are 4:3")
    add(g, "--gen-classes", type=int, default=4, help="class folders of the generated set")

    g = p.add_argument_group("output")
    add(g, "--out", default=None, metavar="DIR",
        help="also write bench.json, bench.txt and bench.png here")
    add(g, "--overwrite", action="store_true", help="replace those files if --out holds them")
    p.set_defaults(func=_run, options=tuple(actions))
