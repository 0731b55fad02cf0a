"""What a run shows: expert-load statistics and figures, readable log lines, TensorBoard and
W&B (offline) output, and the HTML run report (opened in headless Chromium where installed).

The load statistics are checked against formulas written here; the figures against the counts
they draw; a real 2-rank run against the counts its routers produced, recorded independently
by wrapping the router."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

from megatron_ext.multirank import run_on_ranks

COUNTS = np.array(
    [[10, 10, 10, 10], [40, 0, 0, 0], [16, 12, 8, 4], [0, 14, 13, 13]], dtype=np.float64
)  # layers 1..4 x 4 experts: balanced, one expert, graded, one nearly dead


def _load(counts=COUNTS, dropped=0, routed=160):
    from megatron_ext.observe.load import expert_load

    stats = {
        i + 1: {"tokens_per_expert": c, "aux_loss": 0.1 * i, "z_loss": 0.0,
                "dropped": dropped, "routed": routed}
        for i, c in enumerate(counts)
    }  # fmt: skip
    return expert_load(stats)


def test_load_summary_equals_its_formulas():
    from megatron_ext.observe.load import summarize

    s = summarize(_load(dropped=5, routed=35))
    ratios = sorted([1.0, 4.0, 16 / 10, 14 / 10])
    assert s.ratio_max == 4.0 and s.worst_layer == 2
    assert s.ratio_p50 == pytest.approx((1.4 + 1.6) / 2)
    # linear interpolation between ranks: p90 sits at 0.9 * 3 = 2.7 of the sorted ratios
    assert s.ratio_p90 == pytest.approx(ratios[2] + 0.7 * (ratios[3] - ratios[2]))
    # under 10% of the layer's mean (10): layer 2's three empty experts, layer 4's expert 0
    assert s.dead_fraction == pytest.approx(4 / 16)
    assert s.dropped == 20 and s.dropped_share == pytest.approx(20 / (20 + 140))
    assert summarize(_load()).dropped_share == 0.0


def test_heatmap_has_axes_colour_bar_numbers_and_the_worst_layer():
    from matplotlib.patches import Rectangle

    from megatron_ext.observe.figures import load_heatmap

    fig = load_heatmap(_load(), iteration=30)
    ax, cbar = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "layer")
    assert cbar.get_ylabel() == "% of the layer's tokens"
    image = ax.get_images()[0].get_array()
    assert image.shape == (4, 4)  # layers x experts
    share = COUNTS / COUNTS.sum(axis=1, keepdims=True) * 100
    np.testing.assert_allclose(image, share)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}  # fmt: skip
    assert cells == {(i, e): f"{share[i, e]:.0f}" for i in range(4) for e in range(4)}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3", "4"]
    (outline,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert outline.get_xy() == (-0.5, 0.5)  # row 1 = layer 2, the worst
    assert "worst layer 2 (max/mean 4.00" in ax.get_title()


def test_imbalance_figure_has_one_line_per_layer():
    from megatron_ext.observe.figures import imbalance_figure

    history = [(10, {1: 1.2, 2: 3.0}), (20, {1: 1.1, 2: 2.5})]
    (ax,) = imbalance_figure(history).axes
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["layer 1"] == [1.2, 1.1] and lines["layer 2"] == [3.0, 2.5]
    assert ax.get_xlabel() == "iteration" and "max / mean" in ax.get_ylabel()


# ------------------------------------------------------------------------------ a real run
RUN = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0 --seed 7 --lr 3e-3"
    " --moe-aux-loss-coeff 1e-2 --train-iters 4 --log-interval 2 --eval-iters 1"
    " --eval-interval 2 --peak-tflops 1 --expert-model-parallel-size 2"
)


def _recorded_run(argv: list[str]):
    """One rank of a training run whose routers' top-k choices are counted here, per layer
    (training passes only), apart from the layer's own statistics; returns (counts, stdout)."""
    import contextlib
    import io

    import torch

    import pretrain_mixtral
    from megatron_ext.moe.layer import SMoELayer
    from megatron_ext.moe.router import TopKRouter

    seen: dict[int, torch.Tensor] = {}
    set_layer_number, route = SMoELayer.set_layer_number, TopKRouter.forward

    def tagged(self, number):
        set_layer_number(self, number)
        self.router.recorded_layer = number

    def recorded(self, *args, **kwargs):
        routing = route(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            e = self.weight.shape[0]
            ids = routing.topk_ids_TK.flatten()
            counts = torch.bincount(ids, minlength=e)[:e]
            seen[self.recorded_layer] = seen.get(self.recorded_layer, 0) + counts
        return routing

    SMoELayer.set_layer_number, TopKRouter.forward = tagged, recorded
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain_mixtral.run(argv)
    return {k: v.tolist() for k, v in seen.items()}, out.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    argv = f"{RUN} --tensorboard-dir {path}".split()
    results = run_on_ranks(_recorded_run, 2, args=(argv,), timeout=300)
    return path, results


def _events(path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_the_run_logs_figures_and_the_counts_its_routers_saw(run_dir):
    import io

    from PIL import Image

    path, results = run_dir
    acc = _events(path)
    tags = acc.Tags()
    # EP2 over both ranks: the logged counts are the two ranks' sum, over both log intervals
    for layer in (1, 2):
        seen = np.sum([np.array(counts[layer]) for counts, _ in results], axis=0)
        logged = sum(
            np.array(h.histogram_value.bucket)
            for h in acc.Histograms(f"expert_load/tokens_per_expert/layer_{layer}")
        )
        np.testing.assert_array_equal(logged, seen)
        assert seen.sum() == 4 * 8 * 64 * 2  # every (token, choice) pair of 4 steps, top-2
    for tag in ("expert_load/heatmap", "expert_load/imbalance"):
        assert tag in tags["images"]
        steps = [i.step for i in acc.Images(tag)]
        assert steps == [2, 4]
        png = Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string))
        assert png.width > 300 and png.height > 100
    for tag in ("max_over_mean_p50", "max_over_mean_p90", "max_over_mean_max",
                "dead_expert_fraction", "tokens_dropped", "dropped_fraction"):  # fmt: skip
        assert f"expert_load/{tag}" in tags["scalars"]
    assert [s.value for s in acc.Scalars("expert_load/tokens_dropped")] == [0.0, 0.0]


def _readable(text: str) -> bool:
    """Grouped thousands (``6,224``) or at most three significant digits (``82.3``,
    ``0.365``): never ``403.5857``."""
    digits = text.replace(",", "").replace(".", "").lstrip("0")
    return ("," in text and "." not in text) or len(digits) <= 3


def test_log_lines_print_readable_numbers(run_dir):
    _, results = run_dir
    lines = [x for x in results[-1][1].splitlines() if x.startswith("iter ")]
    assert len(lines) == 2
    for line in lines:
        m = re.search(
            r"step ([\d,.]+) ms .*\| ([\d,.]+) tokens/s \| ([\d.]+) ([kMGTP]?)FLOP/s/device "
            r"\| MFU ([\d.]+)% \|",
            line,
        )
        assert m, line
        step, tokens, flops, _, mfu = m.groups()
        assert all(_readable(t) for t in (step, tokens, flops, mfu)), line
        assert 1 <= float(flops) < 1000, line  # the unit prefix fits the number
        assert "| tokens dropped 0 (dropless)" in line


def test_parse_line_reads_what_format_line_prints():
    from megatron_ext.metrics import format_line, parse_line

    values = {"lm loss": 6.78281, "lr": 1.5e-3, "tokens/s": 6224.4, "TFLOP/s/device": 0.00365,
              "MFU": 0.00365}  # fmt: skip
    line = format_line(2, 4, 0.0823, values, None, True)
    assert parse_line(line) == pytest.approx(
        {
            "step ms": 82.3,
            "lm loss": 6.7828,
            "tokens/s": 6224,
            "TFLOP/s/device": 0.00365,
            "MFU": 0.00365,
        }  # fmt: skip
    )


# ------------------------------------------------------------------------------ HTML report
SECTIONS = ("Loss", "Learning rate", "Throughput", "Compute", "Model FLOPs utilisation",
            "Gradient norm", "Skipped steps", "Router losses",
            "Expert load imbalance across layers", "Dead experts and dropped tokens",
            "expert_load/heatmap (iteration 4)", "expert_load/imbalance (iteration 4)")  # fmt: skip


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("report") / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext.report", run_dir[0], "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out}"
    return out


def test_report_holds_every_figure_inline(report):
    text = report.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in text, title
    assert text.count('<img alt="') == len(SECTIONS)
    assert text.count('src="data:image/png;base64,') == len(SECTIONS)
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "validation loss (best)" in text and "tokens/s (median)" in text


def test_report_without_event_files_is_one_clear_error(tmp_path, capsys):
    from megatron_ext.report import main

    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}: no TensorBoard event files (events.out.tfevents.*)\n"
    )


def test_report_opens_in_headless_chromium(report, tmp_path):
    """Every image decodes in a real browser (a probe script copies their natural widths into
    the title, read back from the DOM), and a screenshot of the page is not blank."""
    import shutil
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium not installed (bash tests/install_chromium.sh; CI installs it)")
    probe = tmp_path / "probe.html"
    script = ("<script>addEventListener('load', () => { document.title = 'widths:' + "
              "[...document.images].map(i => i.naturalWidth).join(','); });</script>")  # fmt: skip
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = re.search(r"<title>widths:([\d,]*)</title>", dom.stdout)
    assert widths, dom.stdout[:500]
    assert len(widths.group(1).split(",")) == len(SECTIONS)
    assert all(int(w) > 300 for w in widths.group(1).split(","))  # every PNG decoded
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1000,2000", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1000) and pixels.std() > 10  # text and figures, not blank


# ------------------------------------------------------------------------------ W&B, offline
WANDB_SITE = os.path.join(sys.prefix, "wandb-site")  # tests/install_wandb.sh


def _with_wandb():
    """wandb from tests/install_wandb.sh's folder, after the venv's own packages."""
    if not os.path.isdir(WANDB_SITE):
        pytest.skip("wandb not installed: bash tests/install_wandb.sh (tests/run.sh runs it)")
    if WANDB_SITE not in sys.path:
        sys.path.append(WANDB_SITE)


def _wandb_run(argv, save_dir):
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    sys.path.append(WANDB_SITE)
    import pretrain_mixtral

    pretrain_mixtral.run(argv)


def _wandb_keys(save_dir) -> tuple[set[str], list[int]]:
    """The history keys and steps of an offline run's ``.wandb`` file (LevelDB log format:
    32 KiB blocks of records with a 7-byte header, after a 7-byte file header), decoded with
    wandb's own protobuf."""
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{save_dir}/wandb/offline-run-*/run-*.wandb")
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    keys, steps, pos, buf = set(), [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
                steps.append(rec.history.step.num)
    return keys, steps


def test_wandb_offline_run_logs_the_tensorboard_names(tmp_path):
    _with_wandb()
    tb, wb = tmp_path / "tb", tmp_path / "wb"
    argv = (f"{RUN} --tensorboard-dir {tb} --wandb-project mixtral-tests "
            f"--wandb-exp-name offline --wandb-save-dir {wb}").split()  # fmt: skip
    argv[argv.index("--expert-model-parallel-size") + 1] = "1"
    run_on_ranks(_wandb_run, 1, args=(argv, str(wb)), timeout=300)
    keys, steps = _wandb_keys(wb)
    assert steps == [2, 4]
    acc = _events(str(tb))
    tags = acc.Tags()
    assert set(tags["scalars"]) <= keys  # validation/lm_loss included
    for tag in tags["images"] + tags["histograms"]:
        assert f"{tag}/_type" in keys, tag


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--wandb-project p", "--wandb-project needs --wandb-exp-name"),
        ("--wandb-project p --wandb-exp-name e",
         "--wandb-project needs --wandb-save-dir, or --save (it defaults to <--save>/wandb)"),
    ],
)  # fmt: skip
def test_wandb_flags_are_checked_before_anything_runs(flags, message, monkeypatch):
    from megatron_ext.arguments import parse_args
    from megatron_ext.errors import UsageError

    _with_wandb()
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(f"--model tiny --cpu --mock-data --train-iters 1 {flags}".split(), 1)
    args = parse_args(f"--model tiny --cpu --mock-data --train-iters 1 {flags} --save /s "
                      "--wandb-exp-name e".split(), 1)  # fmt: skip
    assert args.wandb_save_dir == "/s/wandb"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match=r"the wandb package is not installed \(pip install"):
        parse_args(f"--model tiny --cpu --mock-data --train-iters 1 {flags} --save /s "
                   "--wandb-exp-name e".split(), 1)  # fmt: skip
