"""The progress line of the longer commands: drawn only on a terminal, counts to its total, and
erased before the command prints its summary."""
import io

from dali_ipmix.data._io import pool_map
from dali_ipmix.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_line_on_a_terminal_counts_and_is_erased():
    stream = Terminal()
    assert list(track(range(5), "verify", stream=stream, delay=0, interval=0)) == list(range(5))
    text = stream.getvalue()
    assert "verify 1/5   20%" in text and "verify 5/5  100%" in text
    assert text.endswith("\r") and text.split("\r")[-2].strip() == ""      # erased


def test_silent_when_not_a_terminal_or_quick():
    pipe = io.StringIO()                  # a log file or a pipe
    assert list(track(range(5), "verify", stream=pipe, delay=0)) == list(range(5))
    assert pipe.getvalue() == ""
    quick = Terminal()                    # work done before the line's delay
    with Progress("fractals", 3, stream=quick) as bar:
        bar.update(3)
    assert quick.getvalue() == ""


def test_pool_map_keeps_order_and_results_with_a_progress_label(capsys):
    assert pool_map(abs, [-3, 1, -2], jobs=1, progress="synth") == [3, 1, 2]
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
