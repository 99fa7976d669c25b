"""Release decisions over every measured branch, versioned release directories, history,
rollback and crash safety: the decision on constructed candidates, the on-disk protocol on a
small constructed run directory, then the real tiny lineage and sweep."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest

from raypath import releases
from raypath.cli import main
from raypath.lineage import Lineage, Release
from raypath.mirror import RunDir
from raypath.releases import Candidate, Objective, Releaser, decide, standing
from raypath.storage import read_json, write_json

OBJ = Objective({"v1": 0.5, "v2": 0.5})


def _cand(name: str, v1: float, v2: float, test: float | None = None, sweep: str | None = None) -> Candidate:
    metrics = {"val/v1": v1, "val/v2": v2, "loss": 3.0}
    if test is not None:
        metrics["test/v1"] = metrics["test/v2"] = test
    return Candidate(name, "v2", "sweep s" if sweep else "configured", metrics, None, 100, None, sweep)


def _live(name: str, v1: float, v2: float) -> Release:
    return Release(id="r1", version="v2", branch=name, val={"val/v1": v1, "val/v2": v2}, branch_tokens=100)


# --------------------------------------------------------------------------- the decision

def test_first_release_is_the_best_candidate():
    d = decide([_cand("a", 4.0, 3.0), _cand("b", 3.9, 3.0), _cand("c", 4.2, 3.1)], None, OBJ)
    assert d.release.name == "b" and d.beaten == 2 and d.scores["b"] == pytest.approx(3.45)


def test_worse_candidates_keep_the_live_release():
    live = _live("branch-v2", 3.9, 3.0)  # objective 3.45
    cands = [_cand("branch-v2", 3.9, 3.0), _cand("t1", 4.0, 3.0, sweep="s"), _cand("t2", 3.95, 3.0, sweep="s")]
    d = decide(cands, live, OBJ)
    assert d.release is None and d.best.name == "branch-v2" and d.beaten == 2
    d = decide(cands[1:], live, OBJ)  # the live branch not among them (e.g. a legacy record)
    assert d.release is None and d.best.name == "t2" and "does not beat" in d.message


def test_a_tie_keeps_the_live_release_and_a_better_one_replaces_it():
    live = _live("branch-v2", 3.9, 3.0)
    assert decide([_cand("t1", 3.0, 3.9, sweep="s")], live, OBJ).release is None  # same objective
    d = decide([_cand("branch-v2", 3.9, 3.0), _cand("t1", 3.8, 3.0, sweep="s")], live, OBJ)
    assert d.release.name == "t1" and d.release.reason == releases.SWEEP_BEST and d.beaten == 1
    # Closer than TIE is a tie too: a score lower by rounding noise alone replaces nothing, and
    # a candidate worse by it is not counted as beaten.
    assert decide([_cand("t2", 3.9 - 1e-12, 3.0, sweep="s")], live, OBJ).release is None
    d = decide([_cand("a", 3.9, 3.0), _cand("b", 3.9 + 1e-12, 3.0)], None, OBJ)
    assert d.release.name == "a" and d.beaten == 0


def test_a_pinned_release_is_kept_and_the_message_says_what_beats_it():
    d = decide([_cand("t1", 3.0, 3.0, sweep="s")], _live("branch-v2", 3.9, 3.0), OBJ, pinned=True)
    assert d.release is None and "pinned" in d.message and "--pick best" in d.message


def test_the_decision_reads_no_test_split():
    # a has the better validation objective, b the far better test loss: a is released.
    a, b = _cand("a", 3.9, 3.0, test=9.0), _cand("b", 4.0, 3.0, test=1.0)
    assert decide([a, b], None, OBJ).release.name == "a"
    assert decide([b, a], _live("b", 4.0, 3.0), OBJ).release.name == "a"
    assert OBJ.value({"test/v1": 1.0, "test/v2": 1.0}) is None  # test keys alone cannot be scored


def test_candidates_missing_a_split_are_not_scored_and_the_penalty_counts():
    d = decide([Candidate("x", "v2", "configured", {"val/v2": 1.0}, None), _cand("a", 3.9, 3.0)], None, OBJ)
    assert d.release.name == "a" and d.scores["x"] is None
    cheap = Objective({"v1": 0.5, "v2": 0.5}, compute_penalty=1.0, version_tokens=1000)
    long_ = Candidate("long", "v2", "configured", {"val/v1": 3.8, "val/v2": 3.0}, None, 500)
    short = Candidate("short", "v2", "configured", {"val/v1": 3.9, "val/v2": 3.0}, None, 100)
    d = decide([long_, short], None, cheap)
    assert d.release.name == "short" and "(score 3.5500)" in d.message  # 3.4 + 0.5 vs 3.45 + 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_candidate_is_never_released(bad):
    # NaN compared as neither better nor worse: listed first, a diverged trial was released,
    # and it replaced a healthy live release
    diverged, good = _cand("t-diverged", bad, 3.0, sweep="s"), _cand("good", 3.9, 3.0)
    for cands in ([diverged, good], [good, diverged]):
        d = decide(cands, None, OBJ)
        assert d.release.name == "good" and d.scores["t-diverged"] is None
    assert decide([diverged, good], _live("good", 3.9, 3.0), OBJ).release is None
    from raypath.sweep import _pick

    trials = [{"trial_id": "a", "name": "a", "status": "done", "score": bad},
              {"trial_id": "b", "name": "b", "status": "done", "score": 5.0}]
    assert _pick(trials, None)[0]["trial_id"] == "b"  # an old record's score


# --------------------------------------------------------------------------- on disk (constructed run)

def _export(run: Path, name: str) -> str:
    d = run / "exports" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(256))
    write_json(d / "model_card.json", {"branch": name, "version": "v2"})
    return str(d)


def _metrics(v1: float, v2: float, test: float | None = None) -> dict:
    return {"val/v1": v1, "val/v2": v2, "loss": 3.0, **({"test/v2": test} if test is not None else {})}


@pytest.fixture
def run(tmp_path):
    """A constructed run: versions v1, v2; v2's configured branch (objective 3.45) released."""
    run = tmp_path / "run"
    lin = Lineage.open(run, "t", {"sweep": {"weights": {"old": 0.5, "new": 0.5}, "compute_penalty": 0.0}})
    lin.data["versions"] = [{"name": "v1"}, {"name": "v2"}]
    lin.data["main_path"] = [{"version": "v2", "tokens_start": 0, "tokens_end": 1000}]
    lin.record_branch({"name": "branch-v2", "version": "v2", "status": "done", "metrics": _metrics(3.9, 3.0),
                       "tokens_trained": 200, "tokens_total": 1000, "export": _export(run, "branch-v2")})
    Releaser(lin).decide("v2", releases.version_objective(lin.data, "v2"))
    return run


def _add_sweep(run: Path, name: str, trials: dict[str, dict]) -> None:
    lin = Lineage.load(run)
    path = run / "sweeps" / "v2" / name
    _record_sweep(lin, {"version": "v2", "name": name, "path": str(path), "trials": [
        {"trial_id": tid, "name": f"branch-v2-{tid}", "status": "done", "metrics": m, "branch_tokens": 200,
         "export": _export(run, f"branch-v2-{tid}")} for tid, m in trials.items()]})


def _record_sweep(lin: Lineage, record: dict) -> None:
    """A finished sweep as `raypath sweep` leaves it: its results.json, then the lineage's summary."""
    write_json(Path(record["path"]) / "results.json", record, root=lin.run_dir)
    lin.record_sweep(record)


def _decide(run: Path) -> releases.Decision:
    lin = Lineage.load(run)
    return Releaser(lin).decide("v2", releases.version_objective(lin.data, "v2"))


def _pointer(run: Path) -> str:
    return read_json(run / "releases" / "v2" / "current.json")["release"]


def test_release_layout(run):
    vdir = run / "releases" / "v2"
    assert _pointer(run) == "r1" and os.readlink(vdir / "current") == "r1"
    assert (vdir / "current" / "model.safetensors").read_bytes() == (run / "exports/branch-v2/model.safetensors").read_bytes()
    card = read_json(vdir / "r1" / "model_card.json")
    assert card["release"]["id"] == "r1" and card["release"]["reason"] == "configured"
    assert card["release"]["candidates"] == 1 and card["release"]["beat"] == 0
    assert read_json(run / "exports/branch-v2/model_card.json") == {"branch": "branch-v2", "version": "v2"}
    assert read_json(vdir / "r1" / "release.json")["branch"] == "branch-v2"
    lin = Lineage.load(run)
    live = lin.release("v2")
    assert live.path == str(vdir / "r1") and live.id == "r1" and live.objective == pytest.approx(3.45)
    assert lin.release_history("v2").current == "r1"


def test_sweep_all_worse_keeps_then_better_replaces(run):
    _add_sweep(run, "a", {"t1": _metrics(4.0, 3.1), "t2": _metrics(3.95, 3.0)})
    d = _decide(run)
    assert d.release is None and "does not beat" in d.message and _pointer(run) == "r1"
    assert standing(Lineage.load(run).data, "v2")["beat"] == 2

    _add_sweep(run, "b", {"t3": _metrics(3.8, 2.9)})
    assert _decide(run).release.name == "branch-v2-t3"
    lin = Lineage.load(run)
    h = lin.release_history("v2")
    assert [(r.id, r.branch, r.reason) for r in h.releases] == [
        ("r1", "branch-v2", "configured"), ("r2", "branch-v2-t3", "sweep best")]
    assert h.current == "r2" and _pointer(run) == "r2" and h.releases[1].replaced == "r1"
    assert h.releases[1].beat == 3 and h.releases[1].candidates == 4
    assert lin.release("v2").branch == "branch-v2-t3"
    s = standing(lin.data, "v2")
    assert (s["beat"], s["others"]) == (3, 3)


def test_settle_is_the_release_step_of_runs_and_sweeps(run, monkeypatch):
    """Releaser.settle: the decision (or a pin), the live release tagged in tracking, the record."""
    tagged = []
    monkeypatch.setattr(releases, "record_release", lambda spec, entry, rd: tagged.append((spec, entry.id)))
    _add_sweep(run, "a", {"t1": _metrics(3.8, 2.9), "t2": _metrics(3.85, 2.95)})
    lin = Lineage.load(run)
    objective = releases.version_objective(lin.data, "v2")
    out = Releaser(lin, tracking="spec").settle("v2", objective)
    assert out.live.branch == "branch-v2-t1" and "beats" in out.decision and not out.pinned
    assert out.record() == {"pinned": False, "release": str(run / "releases/v2/r2"), "live_release": "r2",
                            "decision": out.decision}
    pinned = Releaser(lin, tracking="spec").settle("v2", objective, pin="t2")
    assert pinned.decision == "released trial t2 as pinned (sweep.pin)" and pinned.pinned
    assert pinned.live.id == "r3" and lin.release("v2").pinned is True
    assert "v2: r3 branch-v2-t2 (pinned), objective" in releases.format_standing(lin)  # said once
    assert tagged == [("spec", "r2"), ("spec", "r3")]


_SETTLER = """
import sys, time
sys.path.insert(0, sys.argv[4])
from test_releases import _add_sweep, _metrics
from pathlib import Path
from raypath import releases
from raypath.lineage import Lineage
from raypath.releases import Releaser
run, name, v2, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[5])
_add_sweep(run, name, {name: _metrics(3.9, v2)})
lin = Lineage.load(run)  # what the process read, then the others release
while time.time() < start:
    time.sleep(0.005)
live = Releaser(lin).settle("v2", releases.version_objective(lin.data, "v2")).live
print(live.id, live.branch)
"""


def test_sweeps_beside_each_other_release_in_turn_each_rN_once(run):
    """Sweeps of one version (beside `raypath run`) each deciding its release at the same moment took
    the same next id, r2, over each other's files and history. Decisions are made in turn, each over
    the branches the others recorded: every release has its own rN, its files and its history entry,
    and the best trial is live."""
    import subprocess
    import sys
    import time

    start = time.time() + 4
    better = {"s1": 2.9, "s2": 2.8, "s3": 2.7}  # each beats the configured branch (3.0)
    procs = [subprocess.Popen([sys.executable, "-c", _SETTLER, str(run), name, str(v2), str(Path(__file__).parent),
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, v2 in better.items()]
    seen = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        seen.add(tuple(out.split()))  # the live release when it had decided: (id, branch)
    lin = Lineage.load(run)
    h = lin.release_history("v2")
    assert seen <= {(r.id, r.branch) for r in h.releases}
    ids = [r.id for r in h.releases]
    assert len(ids) == len(set(ids)) >= 2 and ids[0] == "r1"
    assert {s.name for s in lin.sweep_summaries("v2")} == set(better)
    for r in h.releases[1:]:
        assert read_json(run / "releases/v2" / r.id / "release.json")["branch"] == r.branch
    assert h.live.branch == "branch-v2-s3" and _pointer(run) == h.current
    assert [e["release"] for e in h.log] == ids  # one switch per release, none lost


def test_pick_rolls_back_and_the_pin_holds_until_best(run, capsys):
    _add_sweep(run, "a", {"t1": _metrics(3.8, 2.9)})
    _decide(run)
    assert _pointer(run) == "r2"
    assert main(["release", str(run), "--version", "v2", "--pick", "r1"]) == 0
    out = capsys.readouterr().out
    assert "live release of v2: r1 (branch-v2)" in out and "rollback" in out
    assert _pointer(run) == "r1" and os.readlink(run / "releases/v2/current") == "r1"
    lin = Lineage.load(run)
    assert lin.release("v2").id == "r1" and lin.release("v2").pinned is True
    assert [e["action"] for e in lin.release_history("v2").log] == ["release", "release", "rollback"]
    # an automatic decision (a sweep, a run) keeps the user's choice and says what beats it
    d = _decide(run)
    assert d.release is None and "pinned" in d.message and _pointer(run) == "r1"
    # --pick a trial released before: its release is live again (pinned), not a second copy
    assert main(["release", str(run), "--version", "v2", "--pick", "t1"]) == 0
    h = Lineage.load(run).release_history("v2")
    assert (h.current, h.pinned, h.log[-1]["reason"]) == ("r2", True, "pinned") and _pointer(run) == "r2"
    assert h.ids() == ["r1", "r2"] and not (run / "releases/v2/r3").exists()
    assert "v2: r2 branch-v2-t1 (sweep best, pinned), objective" in releases.format_standing(Lineage.load(run))
    assert list((run / "tb" / "branch-v2-t1").glob("events.out.tfevents.*"))  # tagged, as a run tags its release
    # --pick best hands the version back to the decision
    assert main(["release", str(run), "--version", "v2", "--pick", "r1"]) == 0
    assert main(["release", str(run), "--version", "v2", "--pick", "best"]) == 0
    h = Lineage.load(run).release_history("v2")
    assert (h.current, h.pinned, h.ids()) == ("r2", False, ["r1", "r2"]) and _pointer(run) == "r2"
    assert [e["action"] for e in h.log][-2:] == ["rollback", "release"]
    # picking the live release pins it, and --pick best then unpins it: both are in the history
    assert main(["release", str(run), "--version", "v2", "--pick", "r2"]) == 0
    assert main(["release", str(run), "--version", "v2", "--pick", "best"]) == 0
    h = Lineage.load(run).release_history("v2")
    assert [(e["action"], e["release"]) for e in h.log][-2:] == [("pin", "r2"), ("unpin", "r2")] and not h.pinned
    capsys.readouterr()
    assert main(["release", str(run), "--version", "v2"]) == 0
    switches = [ln.split()[1:3] for ln in capsys.readouterr().out.split("switches:")[1].splitlines()[1:]]
    assert switches[-3:-1] == [["pin", "r2"], ["unpin", "r2"]]
    assert main(["release", str(run), "--version", "v2", "--pick", "nope"]) == 2
    assert "--pick nope: not a release, trial or branch of v2" in capsys.readouterr().err


def test_release_command_lists_candidates_and_history(run, capsys):
    _add_sweep(run, "a", {"t1": _metrics(4.0, 3.1)})
    assert main(["release", str(run), "--version", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("candidates of v2")
    rows = [ln.split() for ln in lines[2:4]]
    assert rows[0][:2] == ["*", "branch-v2"] and rows[1][0] == "branch-v2-t1"  # best first, live marked
    assert "releases of v2 (live: r1)" in out and "does not beat" in out


def test_crash_inside_the_switch_leaves_the_previous_release_live(run, monkeypatch):
    _add_sweep(run, "a", {"t1": _metrics(3.8, 2.9)})

    def crash(path, pointer):
        raise OSError("disk gone")

    monkeypatch.setattr(releases, "_write_pointer", crash)
    with pytest.raises(OSError, match="disk gone"):
        _decide(run)
    vdir = run / "releases" / "v2"
    assert (vdir / "r2" / "model_card.json").is_file()  # written completely, but never switched to
    assert _pointer(run) == "r1" and os.readlink(vdir / "current") == "r1"
    lin = Lineage.load(run)
    assert lin.release("v2").id == "r1" and [r.id for r in lin.release_history("v2").releases] == ["r1"]
    monkeypatch.undo()
    assert _decide(run).release.name == "branch-v2-t1"  # the retry replaces the orphan r2
    assert _pointer(run) == "r2" and Lineage.load(run).release("v2").branch == "branch-v2-t1"


def test_crash_after_the_switch_is_recorded_by_the_next_command(run, monkeypatch, caplog):
    _add_sweep(run, "a", {"t1": _metrics(3.8, 2.9)})

    def crash(self, version, history):
        raise KeyboardInterrupt

    monkeypatch.setattr(Lineage, "set_release_history", crash)
    with pytest.raises(KeyboardInterrupt):
        _decide(run)
    monkeypatch.undo()
    assert _pointer(run) == "r2" and Lineage.load(run).release("v2").id == "r1"
    lin = Lineage.load(run)
    with caplog.at_level("WARNING", logger="raypath.releases"):
        Releaser(lin).sync("v2")
    assert lin.release("v2").id == "r2" and lin.release("v2").branch == "branch-v2-t1"
    # recorded as the release it was, not as an unexplained "recovered"
    last = Lineage.load(run).release_history("v2").log[-1]
    assert (last["action"], last["reason"], last["recovered"], last["replaced"]) == ("release", "sweep best", True, "r1")
    assert "r2 is live (current.json), but the lineage had r1 live; the run stopped before saving it" in caplog.text


def test_a_pin_stopped_before_the_lineage_save_is_recorded_by_the_next_command(run, monkeypatch):
    def crash(self, version, history):
        raise KeyboardInterrupt

    monkeypatch.setattr(Lineage, "set_release_history", crash)
    with pytest.raises(KeyboardInterrupt):
        Releaser(Lineage.load(run)).pick("v2", "r1", releases.version_objective(Lineage.load(run).data, "v2"))
    monkeypatch.undo()
    assert read_json(run / "releases/v2/current.json")["pinned"] and not Lineage.load(run).release("v2").pinned
    lin = Lineage.load(run)
    Releaser(lin).sync("v2")
    h = Lineage.load(run).release_history("v2")
    assert h.pinned and (h.log[-1]["action"], h.log[-1]["release"], h.log[-1]["recovered"]) == ("pin", "r1", True)


# --------------------------------------------------------------------------- the real tiny lineage

def test_run_releases_are_r1_with_a_current_link(tiny_run):
    from transformers import AutoModelForCausalLM

    cfg, lin = tiny_run
    run_dir = Path(cfg.run_dir)
    for r in lin["releases"]:
        vdir = run_dir / "releases" / r["version"]
        assert r["path"] == str(vdir / "r1") and r["reason"] == "configured" and not r["pinned"]
        assert read_json(vdir / "current.json")["release"] == "r1" and os.readlink(vdir / "current") == "r1"
        assert read_json(vdir / "r1" / "model_card.json")["release"]["id"] == "r1"
    AutoModelForCausalLM.from_pretrained(str(run_dir / "releases" / "v3" / "current"), local_files_only=True)
    text = main_output(["status", str(run_dir)])
    assert "v3: r1 branch-v3 (configured), objective" in text and "beat 0 of 0 other candidates" in text


def main_output(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def _to_old_layout(run_dir: Path) -> None:
    """What a run directory released before release histories looks like: ``releases/vK``
    holds the model itself, and the lineage one release entry per version."""
    path = run_dir / "lineage.json"
    lin = json.loads(path.read_text())
    lin.pop("release_history")
    for r in lin["releases"]:
        vdir = run_dir / "releases" / r["version"]
        shutil.move(vdir / "r1", run_dir / "releases" / f"{r['version']}.old")
        shutil.rmtree(vdir)
        shutil.move(run_dir / "releases" / f"{r['version']}.old", vdir)
        card = read_json(vdir / "model_card.json")
        card.pop("release")
        write_json(vdir / "model_card.json", card)
        (vdir / "release.json").unlink()
        r.update(path=str(vdir))
        for key in ("id", "release", "reason", "pinned", "source", "sweep", "trial_id", "objective", "score",
                    "objective_weights", "compute_penalty", "version_tokens", "test", "branch_tokens",
                    "candidates", "beat", "replaced"):
            r.pop(key, None)
    for b in lin["branches"]:
        b["release"] = str(run_dir / "releases" / b["version"])
        b.pop("export")
        shutil.rmtree(run_dir / "exports" / b["name"])
    path.write_text(json.dumps(lin))


def test_old_layout_run_loads_as_r1_and_moves_on_the_next_release(tiny_run_copy):
    from transformers import AutoModelForCausalLM

    run_dir = Path(tiny_run_copy.run_dir)
    _to_old_layout(run_dir)
    vdir = run_dir / "releases" / "v3"
    assert (vdir / "model.safetensors").is_file() and not (vdir / "r1").exists()
    assert "v3: r1 branch-v3 (configured)" in main_output(["status", str(run_dir)])
    lin = Lineage.load(run_dir)
    assert lin.release("v3").id == "r1" and lin.release_history("v3").releases[0].path == str(vdir)
    # a better measured branch of v3 (the same model, exported by a sweep trial)
    export = run_dir / "sweeps" / "v3" / "s" / "exports" / "branch-v3-t1"
    shutil.copytree(vdir, export)
    better = {k: v - 0.01 for k, v in lin.release("v3").val.items()}
    _record_sweep(lin, {"version": "v3", "name": "s", "path": str(export.parents[1]), "trials": [
        {"trial_id": "t1", "name": "branch-v3-t1", "status": "done", "metrics": better, "branch_tokens": 10,
         "export": str(export)}]})
    main_output(["release", str(run_dir), "--version", "v3", "--pick", "t1"])
    assert sorted(p.name for p in vdir.iterdir()) == ["current", "current.json", "r1", "r2"]
    lin = Lineage.load(run_dir)
    assert [r.path for r in lin.release_history("v3").releases] == [str(vdir / "r1"), str(vdir / "r2")]
    assert os.readlink(vdir / "current") == "r2"
    main_output(["release", str(run_dir), "--version", "v3", "--pick", "r1"])
    assert os.readlink(vdir / "current") == "r1"
    AutoModelForCausalLM.from_pretrained(str(vdir / "current"), local_files_only=True)


def test_old_layout_branch_whose_export_a_sweep_replaced_is_exported_again_to_release(tiny_run_copy):
    """Before release histories, a sweep's release overwrote ``releases/vK``, where the configured
    branch had exported: picking that branch exports its final checkpoint again."""
    from safetensors.torch import load_file, save_file

    run_dir = Path(tiny_run_copy.run_dir)
    _to_old_layout(run_dir)
    vdir = run_dir / "releases" / "v3"
    weights = load_file(vdir / "model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, vdir / "model.safetensors")  # the trial's model
    path = run_dir / "lineage.json"
    lin = json.loads(path.read_text())
    configured = next(b for b in lin["branches"] if b["name"] == "branch-v3")
    trial = {**configured, "name": "branch-v3-t1", "sweep": str(run_dir / "sweeps/v3/s"), "trial_id": "t1",
             "metrics": {k: v - 0.01 for k, v in configured["metrics"].items()}}
    lin["branches"].append(trial)
    live = next(r for r in lin["releases"] if r["version"] == "v3")
    live.update(branch="branch-v3-t1", trial_id="t1", sweep=trial["sweep"], val=trial["metrics"])
    path.write_text(json.dumps(lin))

    main_output(["release", str(run_dir), "--version", "v3", "--pick", "branch-v3"])
    lin = Lineage.load(run_dir)
    assert [(r.id, r.branch) for r in lin.release_history("v3").releases] == [("r1", "branch-v3-t1"),
                                                                              ("r2", "branch-v3")]
    released = load_file(vdir / "r2" / "model.safetensors")
    assert all((released[k] == weights[k]).all() for k in weights)  # the branch's own model, not the trial's
    assert (load_file(vdir / "r1" / "model.safetensors")["model.norm.weight"] == 2 * weights["model.norm.weight"]).all()
    assert read_json(run_dir / "exports" / "branch-v3" / "model_card.json")["branch"] == "branch-v3"


def _copy_sweep_run(tiny_sweep, dst: Path) -> tuple[Path, dict]:
    """A copy of the swept lineage without its release: trials measured, nothing released;
    returns it and the sweep's trial records (as read where the copy lies)."""
    src = Path(tiny_sweep["cfg"].run_dir)
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("ray", "branches", "data", "corpus"))
    shutil.rmtree(dst / "releases")
    path = dst / "lineage.json"
    lin = json.loads(path.read_text())
    lin["releases"], lin["release_history"], lin["sweeps"] = [], {}, []
    lin["branches"] = [b for b in lin["branches"] if not b.get("sweep")]
    path.write_text(json.dumps(lin))
    return dst, read_json(dst / Path(tiny_sweep["dir"]).relative_to(src) / "results.json", root=dst)


@pytest.mark.parametrize("margin,kept", [(-0.05, True), (0.05, False)])
def test_sweep_release_against_the_configured_release(tiny_sweep, tmp_path, margin, kept):
    """The sweep's release step on its real trials, with a configured release of v2 that is
    better (``margin`` < 0) or worse than every trial."""
    from raypath.sweep import SweepPlan, _release

    run_dir, record = _copy_sweep_run(tiny_sweep, tmp_path / "run")
    done = [t for t in record["trials"] if t["status"] == "done"]
    best = min(done, key=lambda t: t["score"])
    metrics = {k: min(t["metrics"][k] for t in done) + margin if margin < 0 else best["metrics"][k] + margin
               for k in ("val/v1", "val/v2")}
    export = run_dir / "exports" / "branch-v2"
    shutil.copytree(best["export"], export)
    lin = Lineage.load(run_dir)
    lin.record_branch({"name": "branch-v2", "version": "v2", "status": "done", "metrics": metrics,
                       "tokens_trained": 100, "tokens_total": 1000, "export": str(export)})
    Releaser(lin).decide("v2", releases.version_objective(lin.data, "v2"))
    assert lin.release("v2").reason == "configured"

    ctx = types.SimpleNamespace(run_dir=run_dir, rd=RunDir(run_dir), versions=lin.data["versions"], tracking=None)
    plan = SweepPlan(ctx, 1, lin.main("v2"), record["path"], record["objective_weights"], 0.0,
                     record["version_tokens"])
    out = _release(plan, lin, record["trials"], None)
    h = Lineage.load(run_dir).release_history("v2")
    if kept:
        assert out["released"] is None and out["live_release"] == "r1" and "does not beat" in out["decision"]
        assert [r.branch for r in h.releases] == ["branch-v2"]
    else:
        assert out["released"] == best["trial_id"] and out["live_release"] == "r2"
        assert [(r.branch, r.reason) for r in h.releases] == [("branch-v2", "configured"),
                                                                       (best["name"], "sweep best")]
        live = Lineage.load(run_dir).release("v2")
        assert read_json(Path(live.path) / "model_card.json")["trial_id"] == best["trial_id"]
        assert any(b["name"] == best["name"] and b["sweep"] == record["path"]
                   for b in Lineage.load(run_dir).data["branches"])


def test_a_diverged_branch_is_released_with_a_warning(caplog):
    from raypath.run import warn_if_diverged

    with caplog.at_level("WARNING", logger="raypath.run"):
        warn_if_diverged("branch-v1", {"val/v1": 3.2, "loss": 3.0}, 384)
        assert caplog.text == ""  # below ln(384) = 5.95
        warn_if_diverged("branch-v1", {"val/v1": 25.4, "val/v2": float("nan"), "loss": 30.0}, 384)
    assert "branch-v1: val/v1 25.4, val/v2 nan above ln(vocab_size) = 5.95" in caplog.text


def test_standing_of_a_release_recorded_without_its_objective_says_so():
    """A release entry of a run directory from before release histories has no objective: the
    status line scores it now and says so, rather than calling the score penalised."""
    lin = {"name": "old", "config": {}, "versions": [{"name": "v1"}],
           "branches": [{"name": "branch-v1", "version": "v1", "status": "done", "metrics": {"val/v1": 4.5}}],
           "releases": [{"version": "v1", "version_index": 0, "path": "/old/releases/v1", "branch": "branch-v1",
                         "val": {"val/v1": 4.5}}]}
    line = releases.format_standing(lin)
    assert line.startswith("v1: r1 branch-v1 (configured), objective - (not recorded; scored now 4.5000)"), line
    assert "compute penalty" not in line
