"""Releases: one decision per version over every measured branch, a history, and rollbacks.

Every finished branch of a version is a **candidate** for its release: the
configured release branch (``raypath run``), every finished trial of every sweep
of that version, and branches released before. The **decision** scores them all
with the version's objective (weighted ``val/*`` losses plus the optional
compute penalty; no other split is read) and releases the best one only when it
beats the live release; a tie or a worse best keeps the live release. A live
release that a user chose (``raypath sweep --pin``, ``raypath release --pick``)
is never replaced by an automatic decision: the decision says what would beat
it, and ``raypath release --pick best`` hands the version back to the decision.

On disk, per version::

    releases/vK/rN/             the model (hard links to the branch's export where the
                                filesystem allows, a copy inside the bucket for a remote
                                run, else a copy), tokenizer,
                                model_card.json (with the release's facts), release.json
    releases/vK/current.json    {"release": "rN", ...}: which release is live
    releases/vK/current         symlink -> rN, for local readers (``from_pretrained``)

``current.json`` is the commit point: a release directory is written completely
(atomic rename) before the pointer is switched (atomic replace of a small file),
so a crash at any point leaves either the previous or the new release live,
never a partial one. A plain file rather than a symlink is the truth because an
object store has no symlinks and renames: for a remote run directory
(:mod:`raypath.mirror`) the pointer is one small object, replaced whole by its
upload. The ``current`` symlink is derived from it (replaced atomically with
``os.replace`` of a temporary symlink) and repaired whenever they disagree.

In the lineage, ``release_history[vK]`` holds ``current``, ``pinned``, the
ordered ``releases`` (r1, r2, ...) and a ``log`` of every switch (release or
rollback) and of every pin and unpin; ``releases`` keeps one entry per version, the live one, for every
reader that only wants the released model. A crash after the pointer switch
but before the lineage save is recovered from ``rN/release.json`` by
:func:`sync`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from raypath.lineage import RESULTS_JSON, Lineage, Release, ReleaseHistory, Sweep, sweep_trials
from raypath.lineage import Branch as BranchEntry
from raypath.mirror import SWEEP_STANDING, RunDir
from raypath.storage import LOCKS_DIR, atomic_dir, file_lock, read_json, write_json
from raypath.tracking import TrackingSpec, record_release

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
POINTER = "current.json"
LINK = "current"
RELEASE_JSON = "release.json"
#: Why a release went live.
CONFIGURED, SWEEP_BEST, PINNED, ROLLBACK = "configured", "sweep best", "pinned", "rollback"
#: Candidates closer than this in score are a tie, and a tie keeps the live release.
TIE = 1e-9


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the objective

def objective_weights(names: list[str], k: int, weights: dict[str, float]) -> dict[str, float]:
    """Val split -> weight: ``w_old`` spread evenly over the versions before k, ``w_new`` on k.

    Weights are normalised to sum to 1; for the first version the objective is its own loss.
    """
    own = names[k]
    if k == 0:
        return {own: 1.0}
    total = weights.get("old", 0.0) + weights.get("new", 0.0)
    old = weights.get("old", 0.0) / total
    out = {name: old / k for name in names[:k]}
    out[own] = weights.get("new", 0.0) / total
    return out


@dataclass(frozen=True)
class Objective:
    """How a version's candidates are scored: ``sum_s w_s * val/s + penalty * tokens / version_tokens``.

    weights: val split name -> weight (already normalised, see :func:`objective_weights`).
    compute_penalty: ``sweep.compute_penalty`` (0 = loss only).
    version_tokens: tokens of the version's main-path segment (scales the penalty).
    """

    weights: dict[str, float]
    compute_penalty: float = 0.0
    version_tokens: int = 1

    def value(self, metrics: dict, split: str = "val") -> float | None:
        """The weighted loss on ``split``; None when a version's split is missing or not finite
        (a diverged branch: NaN would compare as neither better nor worse and could be
        released). Selection (scores, decisions, sweeps) reads ``val`` only; ``test`` is the
        same weighting over the held-out test splits, for reporting next to it."""
        try:
            value = sum(w * float(metrics[f"{split}/{name}"]) for name, w in self.weights.items())
        except (KeyError, TypeError):
            return None
        return value if math.isfinite(value) else None

    def score(self, metrics: dict, branch_tokens: float | None) -> float | None:
        return self.score_of(self.value(metrics), branch_tokens)

    def score_of(self, value: float | None, branch_tokens: float | None) -> float | None:
        """The score of a branch whose :meth:`value` is ``value``."""
        if value is None:
            return None
        return value + self.compute_penalty * float(branch_tokens or 0) / max(self.version_tokens, 1)

    def record(self) -> dict:
        return {"objective_weights": dict(self.weights), "compute_penalty": self.compute_penalty,
                "version_tokens": self.version_tokens}


def version_objective(lineage: Lineage | dict, version: str, weights: dict[str, float] | None = None,
                      compute_penalty: float | None = None) -> Objective:
    """The objective of ``version`` from ``{old, new}`` weights; by default the lineage
    config's ``sweep.weights`` / ``sweep.compute_penalty`` (what ``raypath run`` uses)."""
    lineage = Lineage.of(lineage)
    sweep_cfg = lineage.config.get("sweep") or {}
    weights = weights if weights is not None else sweep_cfg.get("weights", {"old": 0.5, "new": 0.5})
    penalty = compute_penalty if compute_penalty is not None else sweep_cfg.get("compute_penalty", 0.0)
    names = lineage.version_names()
    main = lineage.main(version)
    tokens = main.tokens if main else 1
    return Objective(objective_weights(names, names.index(version), weights), float(penalty or 0.0), tokens)


# --------------------------------------------------------------------------- candidates

@dataclass
class Candidate:
    """A finished branch of a version that could be released.

    name: the branch (segment) name, unique within a run.
    source: ``configured`` or ``sweep <name>``.
    metrics: its final metrics (``val/*``, maybe ``test/*``, ``loss``).
    export: its exported model directory.
    branch_tokens: tokens its decay trained (for the compute penalty).
    branch: its lineage branch entry when known (recorded in ``branches`` on release).
    """

    name: str
    version: str
    source: str
    metrics: dict
    export: str | None
    branch_tokens: float | None = None
    trial_id: str | None = None
    sweep: str | None = None
    branch: BranchEntry | None = None

    @property
    def reason(self) -> str:
        return CONFIGURED if self.sweep is None else SWEEP_BEST


def candidates(lineage: Lineage | dict, version: str, extra: Iterable[Candidate] = ()) -> list[Candidate]:
    """Every finished branch of ``version`` the lineage knows, plus ``extra`` (a sweep's own
    trials, before they are recorded); one per branch name, in the order first seen."""
    lineage = Lineage.of(lineage)
    out: dict[str, Candidate] = {}
    for s in lineage.sweeps(version):
        for t in s.trials:
            if t.status == "done" and t.metrics and not t.pruned:  # a pruned trial has no model to release
                out[t.name] = Candidate(t.name, version, f"sweep {s.name}", t.metrics, t.export,
                                        t.branch_tokens, t.trial_id, s.path)
    for b in lineage.branches(version):
        known = out.get(b.name)
        if known is not None:  # a released sweep trial: keep the trial's export, add its branch entry
            known.branch = b
            continue
        source = f"sweep {Path(b.sweep).name}" if b.sweep else CONFIGURED
        out[b.name] = Candidate(b.name, version, source, b.metrics, b.export or b.extra.get("release"),
                                b.tokens_trained, b.trial_id, b.sweep, b)
    for c in extra:
        out[c.name] = c
    return list(out.values())


# --------------------------------------------------------------------------- the decision

@dataclass
class Decision:
    """What the decision over a version's candidates concluded.

    best: the best-scoring candidate (None when none could be scored).
    release: the candidate to release now; None keeps the live release.
    scores: branch name -> score (None: a split is missing).
    live_score: the live release's score under the same objective (None: no release yet).
    beaten: how many other scored candidates the winner (or the kept release) beats.
    """

    best: Candidate | None
    release: Candidate | None
    scores: dict[str, float | None]
    live_score: float | None
    beaten: int
    message: str
    entry: Release | None = None  # the release written, when one was

    @property
    def scored(self) -> int:
        return sum(s is not None for s in self.scores.values())


def decide(cands: list[Candidate], live: Release | None, objective: Objective, pinned: bool = False) -> Decision:
    """Release the best candidate if it beats the live release (pure: reads nothing else).

    live: the version's live release entry (its ``val`` losses and ``branch_tokens`` are
        re-scored with ``objective``, so releases decided under other weights compare fairly).
    pinned: the live release was chosen by a user; it is kept and the message says what beats it.
    """
    scores = {c.name: objective.score(c.metrics, c.branch_tokens) for c in cands}
    scored = [c for c in cands if scores[c.name] is not None]
    best = min(scored, key=lambda c: scores[c.name]) if scored else None
    live_score = objective.score(live.val, live.branch_tokens) if live else None

    def beaten_by(score: float, name: str) -> int:
        return sum(scores[c.name] > score + TIE for c in scored if c.name != name)

    if best is None:
        return Decision(None, None, scores, live_score, 0,
                        "no candidate has a finite loss on every validation split of the objective")
    b = scores[best.name]
    what = "score" if objective.compute_penalty else "objective"  # a penalised score is not the loss
    if live is None:
        return Decision(best, best, scores, None, beaten_by(b, best.name),
                        f"{best.name} is the best of {len(scored)} candidates ({what} {b:.4f})")
    tag = f"{live.version}'s release {live.id} ({live.branch}, {what} {_fmt(live_score)})"
    kept_beats = beaten_by(live_score, live.branch) if live_score is not None else 0
    others = [c for c in scored if c.name != live.branch]
    if not others or best.name == live.branch or (live_score is not None and b >= live_score - TIE):
        rival = min(others, key=lambda c: scores[c.name]) if others else None
        why = (f"the best other candidate {rival.name} ({scores[rival.name]:.4f}) does not beat it"
               if rival else "no other candidate")
        return Decision(best, None, scores, live_score, kept_beats, f"kept {tag}: {why}")
    if pinned:
        return Decision(best, None, scores, live_score, kept_beats,
                        f"kept {tag}, pinned by a user: {best.name} ({b:.4f}) beats it; release it with "
                        f"`raypath release RUN_DIR --version {live.version} --pick best`")
    return Decision(best, best, scores, live_score, beaten_by(b, best.name),
                    f"{best.name} ({b:.4f}) beats {tag}")


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@dataclass
class Settled:
    """What :meth:`Releaser.settle` did: the decision's message (or the pin's), the live
    release entry after it (None: the version has none) and whether a pin chose it."""

    decision: str
    live: Release | None
    pinned: bool = False

    def record(self) -> dict:
        """The release part of a sweep's record: the live release's path and id, and the decision."""
        path, rid = (self.live.path, self.live.id) if self.live else (None, None)
        return {"pinned": self.pinned, "release": path, "live_release": rid, "decision": self.decision}


# --------------------------------------------------------------------------- on disk

@dataclass
class Releaser:
    """Writes and switches one run directory's releases, and records them in its lineage.

    lineage: a :class:`raypath.lineage.Lineage` (saved after every change); its run
        directory (:attr:`~raypath.lineage.Lineage.rd`, local or remote) holds the releases.
    tracking: the run's experiment tracking, where :meth:`settle` tags the live release
        (:mod:`raypath.tracking`); None = none.
    """

    lineage: Lineage
    tracking: TrackingSpec | None = None

    @property
    def rd(self) -> RunDir:
        return self.lineage.rd

    def version_dir(self, version: str) -> Path:
        return self.rd / RELEASES_DIR / version

    def history(self, version: str) -> ReleaseHistory:
        return self.lineage.release_history(version) or ReleaseHistory()

    def live(self, version: str) -> Release | None:
        return self.history(version).live

    # ---------------------------------------------------------------- decisions

    @contextlib.contextmanager
    def deciding(self, version: str) -> Iterator[None]:
        """Hold ``version``'s release lock, with the lineage caught up with what other processes
        saved: ``raypath run``, a sweep beside it and ``raypath release --pick`` decide one
        version's release in turn, each over the others' branches, and never take the same ``rN``."""
        with file_lock(self.rd.path / LOCKS_DIR / f"release-{version}.lock", f"releasing {version}",
                       store=self.rd.mirror):
            self.lineage.refresh()
            yield

    def settle(self, version: str, objective: Objective, extra: Iterable[Candidate] = (),
               pin: str | None = None) -> Settled:
        """The release step of ``raypath run`` and of a sweep (``sweep.pin`` / ``raypath sweep --pin``).

        Decides ``version``'s release over every candidate (``extra``: a sweep's own trials,
        before the lineage records them), or with ``pin`` releases that trial or branch,
        pinned; then tags the live release in the run's experiment tracking.
        """
        with self.deciding(version):
            return self._settle(version, objective, extra, pin)

    def _settle(self, version: str, objective: Objective, extra: Iterable[Candidate], pin: str | None) -> Settled:
        if pin:
            entry = self.pick(version, pin, objective, extra=extra)
            what = f"trial {entry.trial_id}" if entry.trial_id else entry.branch
            message = f"released {what} as pinned (sweep.pin)"
        else:
            message = self.decide(version, objective, extra=extra).message
        if self.lineage.release(version) is not None:
            record_release(self.tracking, self.lineage.release(version), self.rd)
        return Settled(message, self.live(version), bool(pin))

    def decide(self, version: str, objective: Objective, extra: Iterable[Candidate] = (),
               respect_pin: bool = True) -> Decision:
        """Decide ``version``'s release over every candidate; release the winner when it beats the live one."""
        self.sync(version)
        cands = candidates(self.lineage, version, extra)
        h = self.history(version)
        d = decide(cands, h.live, objective, pinned=respect_pin and h.pinned)
        if d.release is not None:
            d.entry = self.release(version, d.release, d.release.reason, objective, d)
        log.info("%s: %s", version, d.message)
        return d

    def pick(self, version: str, what: str, objective: Objective, extra: Iterable[Candidate] = ()) -> Release:
        """``--pick``: ``rN`` rolls back to an earlier release, ``best`` hands the version back
        to the decision, a trial id or branch name releases that branch (pinned)."""
        with self.deciding(version):
            return self._pick(version, what, objective, extra)

    def _pick(self, version: str, what: str, objective: Objective, extra: Iterable[Candidate]) -> Release:
        self.sync(version)
        h = self.history(version)
        if what == "best":
            d = self.decide(version, objective, respect_pin=False)
            if d.release is None and h.pinned:
                self._unpin(version)
            return self.live(version)
        if what in h.ids():
            return self.rollback(version, what)
        cands = candidates(self.lineage, version, extra)
        chosen = next((c for c in cands if what in (c.name, c.trial_id)), None)
        if chosen is None:
            gone = next((s.name for s in self.lineage.sweeps(version) for t in s.trials
                         if t.pruned and what in (t.name, t.trial_id)), None)
            if gone is not None:
                raise FileNotFoundError(f"--pick {what}: a trial of sweep {gone!r} that kept no weights to release: "
                                        f"the sweep deleted them, keeping only its best trials' (sweep.keep_trials)")
            known = ", ".join(h.ids() + [c.trial_id or c.name for c in cands]) or "none"
            raise FileNotFoundError(f"--pick {what}: not a release, trial or branch of {version} "
                                    f"(known: {known})")
        live = self.live(version)
        if live is not None and live.branch == chosen.name:
            self._pin(version)
            log.info("%s: %s is already live (%s); pinned", version, chosen.name, live.id)
            return self.live(version)
        d = decide(cands, live, objective)
        return self.release(version, chosen, PINNED, objective, d)

    # ---------------------------------------------------------------- writing

    def release(self, version: str, cand: Candidate, reason: str, objective: Objective, d: Decision) -> Release:
        """Copy ``cand``'s model to ``releases/version/rN``, switch ``current`` to it, record it;
        a model released before (same branch, same metrics: ``--pick best`` after a rollback) is
        switched back to, not copied again."""
        h = self.history(version)
        vdir = self.version_dir(version)
        self._migrate_flat(version, h)
        before = next((r for r in reversed(h.releases) if r.branch == cand.name and r.val == {
            k: v for k, v in cand.metrics.items() if k.startswith("val/")}), None)
        if before is not None:
            return self._switch_back(version, before.id, reason)
        rid = f"r{1 + max((int(i[1:]) for i in h.ids()), default=0)}"
        src = self._model_dir(cand, h)
        score = d.scores.get(cand.name)
        beaten = sum(s is not None and s > score + TIE for n, s in d.scores.items() if n != cand.name) \
            if score is not None else 0
        entry = {
            "id": rid, "version": version, "version_index": self._version_index(version),
            "path": str(vdir / rid), "branch": cand.name, "reason": reason, "source": cand.source,
            "sweep": cand.sweep, "trial_id": cand.trial_id,
            "objective": objective.value(cand.metrics), "test_objective": objective.value(cand.metrics, "test"),
            "score": score, **objective.record(),
            "val": {k: v for k, v in cand.metrics.items() if k.startswith("val/")},
            "test": {k: v for k, v in cand.metrics.items() if k.startswith("test/")},
            "branch_tokens": cand.branch_tokens,
            "tokens_total": cand.branch.tokens_total if cand.branch and cand.branch.tokens_total is not None
            else self._card(src).get("tokens_total"),
            "candidates": d.scored, "beat": beaten, "replaced": h.current, "released": _now(),
        }
        if entry["tokens_total"] is None:
            entry["tokens_total"] = self._tokens_total(cand)
        card = {**self._card(src), "release": {k: entry[k] for k in (
            "id", "reason", "branch", "objective", "test_objective", "score", "objective_weights", "val", "test",
            "candidates", "beat", "replaced", "released")}}
        # An rN that is not in the history is the orphan of a crash before the switch: remove it
        # everywhere first, as publishing skips remote files of an unchanged size.
        self.rd.remove(vdir / rid)
        in_store = self.rd.copy_in_store(src, vdir / rid)  # a bucket's weights never pass through here
        with atomic_dir(vdir / rid) as tmp:
            if not in_store:
                shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
            write_json(tmp / "model_card.json", card)  # a new file: the export's card stays as it was
            write_json(tmp / RELEASE_JSON, entry, root=self.rd.path)
        self.rd.publish(vdir / rid)
        pinned = reason in (PINNED, ROLLBACK)
        self._switch(vdir, rid, pinned)
        if cand.sweep is not None:  # a sweep's trial joins the lineage's branches when released
            branch = self._branch_entry(cand)
            if branch is not None:
                self.lineage.record_branch(branch)
        h.releases.append(Release.from_dict(entry))
        h.log.append({"time": entry["released"], "release": rid, "action": "release", "reason": reason,
                      "replaced": h.current})
        h.current, h.pinned = rid, pinned
        self.lineage.set_release_history(version, h)
        log.info("released %s %s from %s (%s): objective %s, beat %d of %d other candidates",
                 version, rid, cand.name, reason, _fmt(entry["objective"]), beaten, max(d.scored - 1, 0))
        return h.live

    def rollback(self, version: str, rid: str) -> Release:
        """Make the earlier release ``rid`` live again (pinned), recorded in the log."""
        h = self.history(version)
        if h.current == rid:
            self._pin(version)
            log.info("%s: %s is already live; pinned", version, rid)
            return self.live(version)
        self._migrate_flat(version, h)
        entry = h.get(rid)
        path = self.version_dir(version) / rid
        if not self.rd.remote(path) and not (path / "model_card.json").is_file():  # (not downloaded to switch)
            raise FileNotFoundError(f"{path}: release {rid} of {version} is missing on disk")
        self._switch(self.version_dir(version), rid, True)
        h.log.append({"time": _now(), "release": rid, "action": "rollback", "reason": ROLLBACK,
                      "replaced": h.current})
        h.current, h.pinned = rid, True
        self.lineage.set_release_history(version, h)
        log.info("%s: rolled back to %s (%s)", version, rid, entry.branch)
        return h.live

    def _switch_back(self, version: str, rid: str, reason: str) -> Release:
        h = self.history(version)
        pinned = reason in (PINNED, ROLLBACK)
        self._switch(self.version_dir(version), rid, pinned)
        h.log.append({"time": _now(), "release": rid, "action": "release", "reason": reason, "replaced": h.current})
        h.current, h.pinned = rid, pinned
        self.lineage.set_release_history(version, h)
        log.info("released %s %s again (%s, %s): it was released before", version, rid, h.get(rid).branch, reason)
        return h.live

    def _pin(self, version: str, pinned: bool = True) -> None:
        """Pin (or hand back to the decisions) the live release; the log keeps it with the switches,
        as it decides what later sweeps and runs may release."""
        h = self.history(version)
        if h.pinned != pinned:
            self._switch(self.version_dir(version), h.current, pinned)
            h.log.append({"time": _now(), "release": h.current, "action": "pin" if pinned else "unpin"})
            h.pinned = pinned
            self.lineage.set_release_history(version, h)

    def _unpin(self, version: str) -> None:
        self._pin(version, False)

    def _switch(self, vdir: Path, rid: str, pinned: bool) -> None:
        """The commit point: replace ``current.json`` (and publish it), then the local symlink."""
        _write_pointer(vdir / POINTER, {"release": rid, "pinned": pinned, "switched": _now()})
        self.rd.publish(vdir / POINTER)
        _link_current(vdir, rid)

    # ---------------------------------------------------------------- recovery and old layouts

    def sync(self, version: str) -> None:
        """Make the lineage agree with ``current.json`` (the truth) after a crash between the
        switch and the lineage save; repair the ``current`` symlink."""
        with self.deciding(version):  # not while another process is between the two
            self._sync(version)

    def _sync(self, version: str) -> None:
        vdir = self.version_dir(version)
        self.rd.fetch(vdir / POINTER, missing_ok=True)
        if not (vdir / POINTER).is_file():
            return
        ptr = read_json(vdir / POINTER)
        rid, h = ptr["release"], self.history(version)
        if rid != h.current:
            entry = {"time": ptr.get("switched"), "release": rid, "action": "recovered", "replaced": h.current}
            if rid not in h.ids():  # released, then stopped before the lineage was saved: as released
                self.rd.fetch(vdir / rid / RELEASE_JSON)
                release = Release.from_dict(read_json(vdir / rid / RELEASE_JSON, root=self.rd.path))
                h.releases.append(release)
                entry.update(action="release", reason=release.reason, recovered=True)
            log.warning("%s: %s is live (%s), but the lineage had %s; the run stopped before saving it: "
                        "recorded", version, rid, POINTER, f"{h.current} live" if h.current else "no release")
            h.log.append(entry)
            h.current, h.pinned = rid, bool(ptr.get("pinned"))
            self.lineage.set_release_history(version, h)
        elif bool(ptr.get("pinned")) != h.pinned:  # a pin or unpin stopped before the lineage save
            h.pinned = bool(ptr.get("pinned"))
            h.log.append({"time": ptr.get("switched"), "release": rid, "action": "pin" if h.pinned else "unpin",
                          "recovered": True})
            self.lineage.set_release_history(version, h)
        _link_current(vdir, rid)

    def _migrate_flat(self, version: str, h: ReleaseHistory) -> None:
        """An old run directory released ``releases/vK`` itself (model files directly in it):
        move it to ``releases/vK/r1`` before a second release lands next to it. Each step is a
        rename, and an interrupted migration is finished by the next call."""
        vdir = self.version_dir(version)
        aside = vdir.with_name(f".{version}.r1")
        # (by name: a copied run directory keeps the old absolute paths)
        legacy = next((r for r in h.releases if Path(r.path).name == version), None)
        if legacy is None:
            return
        if not vdir.is_dir() and not aside.is_dir():
            self.rd.fetch(vdir, missing_ok=True)  # a remote run's mirror holds no releases at start
        if (vdir / "model_card.json").is_file():
            os.replace(vdir, aside)
        if aside.is_dir():
            vdir.mkdir(exist_ok=True)
            os.replace(aside, vdir / legacy.id)
        legacy.path = str(vdir / legacy.id)
        self.rd.publish(vdir / legacy.id)
        self._switch(vdir, h.current, h.pinned)
        self.lineage.set_release_history(version, h)
        log.info("%s: moved the release directory %s to %s", version, vdir, legacy.path)

    # ---------------------------------------------------------------- helpers

    def _version_index(self, version: str) -> int:
        return self.lineage.version_names().index(version)

    def _model_dir(self, cand: Candidate, h: ReleaseHistory) -> Path:
        """The candidate's exported model; a branch released before may only live in its release."""
        dirs = [cand.export] + [r.path for r in reversed(h.releases) if r.branch == cand.name]
        for d in dirs:
            if d is None:
                continue
            if self.rd.fetch(Path(d) / "model_card.json", missing_ok=True).is_file():  # the card alone
                return Path(d)
        if cand.branch is not None and cand.branch.checkpoint and self._flat_export(cand):
            return self._export_again(cand.branch)
        raise FileNotFoundError(f"{cand.name}: no exported model (looked in {', '.join(filter(None, dirs))})")

    def _flat_export(self, cand: Candidate) -> bool:
        """Whether ``cand`` exported into ``releases/vK`` itself, as branches did before release
        histories: a later release of the version (a sweep's) replaced its model there."""
        return cand.export is not None and Path(cand.export).resolve() == self.version_dir(cand.version).resolve()

    def _export_again(self, branch: BranchEntry) -> Path:
        """Export a branch's final checkpoint to ``exports/<branch>`` (where branches export
        now), with the card its own export had: its facts and final metrics."""
        from raypath.export import checkpoint_source, load_model, save_model_dir

        run_dir = self.rd.path.resolve()
        out = run_dir / "exports" / branch.name
        src = checkpoint_source(self.lineage, run_dir, Path(branch.checkpoint))
        model = load_model(src, self.lineage, run_dir)
        names = self.lineage.version_names()
        card = {"run": self.lineage.name, "version": branch.version, "branch": branch.name,
                "forked_from": branch.forked_from, "fork_step": branch.fork_step, "branch_steps": branch.steps,
                "decay": branch.decay, "max_lr": (self.lineage.config.get("train") or {}).get("max_lr"),
                "trained_on_versions": names[: names.index(branch.version) + 1],
                "seq_len": (self.lineage.config.get("data") or {}).get("seq_len"),
                "tokens_total": branch.tokens_total, "final_metrics": branch.metrics}
        with atomic_dir(out) as tmp:
            save_model_dir(tmp, model, src.tokenizer_dir)
            write_json(tmp / "model_card.json", card, root=run_dir)
        self.rd.publish(out)
        branch.export = str(out)
        branch.extra["release"] = str(out)
        log.info("%s: its export in releases/%s was replaced by a later release; exported its checkpoint %s "
                 "again to %s", branch.name, branch.version, branch.checkpoint, out)
        return out

    @staticmethod
    def _card(src: Path) -> dict:
        return read_json(src / "model_card.json")

    def _tokens_total(self, cand: Candidate) -> int | None:
        main = self.lineage.main(cand.version)
        return main.tokens_end if main else None

    def _branch_entry(self, cand: Candidate) -> BranchEntry | None:
        """The lineage branch entry of a released candidate (a sweep trial's from its results)."""
        if cand.branch is not None and cand.branch.checkpoint:
            return cand.branch
        if not cand.sweep or not (Path(cand.sweep) / RESULTS_JSON).is_file():
            return None
        trial = next((t for t in sweep_trials(cand.sweep) if t.get("name") == cand.name), None)
        if trial is None or "branch" not in trial:
            return None
        return BranchEntry.from_dict({**trial["branch"], "sweep": cand.sweep, "trial_id": trial["trial_id"],
                                      "objective": trial.get("objective"), "score": trial.get("score")})


def _write_pointer(path: Path, pointer: dict) -> None:
    write_json(path, pointer)


def _link_current(vdir: Path, rid: str) -> None:
    """``vdir/current -> rid``, replaced atomically; skipped where the release is not local."""
    link = vdir / LINK
    if not (vdir / rid).is_dir() or (link.is_symlink() and os.readlink(link) == rid):
        return
    tmp = vdir / f".{LINK}.{os.getpid()}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(rid, tmp)
    os.replace(tmp, link)


def _link_or_copy(src: str, dst: str) -> str:
    # Exports are write-once (replaced by rename, never edited), so a hard link is a safe,
    # free copy on the same filesystem; elsewhere (another mount, an object store mirror) copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --------------------------------------------------------------------------- presentation

def standing(lineage: Lineage | dict, version: str) -> dict | None:
    """The live release of ``version`` and how many of the version's other candidates it beats,
    under the objective it was released with (the config's for older records)."""
    lineage = Lineage.of(lineage)
    h = lineage.release_history(version)
    live = h.live if h else None
    if live is None:
        return None
    obj = (Objective(live.objective_weights, live.compute_penalty, live.version_tokens)
           if live.objective_weights else version_objective(lineage, version))
    live_score = obj.score(live.val, live.branch_tokens)
    others = [s for n, s in candidate_scores(lineage, version, obj).items() if n != live.branch and s is not None]
    beat = sum(s > live_score + TIE for s in others) if live_score is not None else 0
    return {"release": live, "pinned": h.pinned, "score": live_score, "beat": beat,
            "others": len(others), "history": h.ids()}


#: A finished sweep's file of what :func:`candidate_scores` needs of its trials (:func:`standing_record`).
STANDING_JSON = SWEEP_STANDING


def standing_record(record: Mapping) -> dict:
    """What a version's standing needs of a finished sweep (its record, as ``results.json`` holds
    it), written next to it as :data:`STANDING_JSON`: per finished trial with metrics (a
    release candidate) its name, branch tokens and weighted val loss under the sweep's objective
    weights. Unlike ``results.json``, whose trials keep a val and a test loss per version so far,
    it grows with the trials only; ``n_trials``, ``best`` and ``released`` tie it to the lineage's
    summary of the sweep."""
    weights = dict(record.get("objective_weights") or {})
    obj = Objective(weights)
    trials = record.get("trials") or []
    return {"objective_weights": weights, "n_trials": len(trials), "best": record.get("best"),
            "released": record.get("released"),
            "trials": [[t.get("name"), t.get("branch_tokens"), obj.value(t["metrics"])] for t in trials
                       if t.get("status", "done") == "done" and t.get("metrics")]}


def _standing_of(sweep: Sweep, weights: Mapping[str, float]) -> list | None:
    """The sweep's :data:`STANDING_JSON` trials, when it holds them for ``weights`` (same splits
    and order: the sums must be the ones :meth:`Objective.value` makes) and for the sweep the
    lineage summarises; None otherwise (a sweep recorded before the file, or an objective
    changed since), and the caller reads the sweep's trials."""
    if not sweep.path:
        return None
    try:
        rec = read_json(Path(sweep.path) / STANDING_JSON)
    except (OSError, ValueError):
        return None
    if (not isinstance(rec, dict) or not isinstance(rec.get("trials"), list)
            or list((rec.get("objective_weights") or {}).items()) != list(weights.items())
            or (rec.get("n_trials"), rec.get("best"), rec.get("released"))
            != (sweep.extra.get("n_trials"), sweep.best, sweep.released)):
        return None
    return rec["trials"]


def candidate_scores(lineage: Lineage, version: str, objective: Objective) -> dict[str, float | None]:
    """Branch name -> score under ``objective`` of every candidate of ``version``: what
    :func:`decide` scores :func:`candidates` by, read from each sweep's :data:`STANDING_JSON`
    where it applies instead of its trials."""
    out: dict[str, float | None] = {}
    for s in lineage.sweep_summaries(version):
        held = None if s.trials else _standing_of(s, objective.weights)
        if held is not None:
            for name, tokens, value in held:
                out[name] = objective.score_of(value, tokens)
            continue
        for t in lineage.with_trials(s).trials:
            if t.status == "done" and t.metrics and not t.pruned:  # a pruned trial has no model to release
                out[t.name] = objective.score(t.metrics, t.branch_tokens)
    for b in lineage.branches(version):
        if b.name not in out:
            out[b.name] = objective.score(b.metrics, b.tokens_trained)
    return out


def format_standing(lineage: Lineage | dict) -> str:
    """One line per version: the live release, why, and how many candidates it beat."""
    lineage = Lineage.of(lineage)
    lines = []
    for name in lineage.version_names():
        s = standing(lineage, name)
        if s is None:
            continue
        r = s["release"]
        if r.objective is None:  # released by a raypath that did not record it
            score = f" (not recorded; scored now {_fmt(s['score'])})" if s["score"] is not None else ""
        else:
            score = "" if s["score"] == r.objective else f" (score {_fmt(s['score'])} with the compute penalty)"
        pin = ", pinned" if s["pinned"] and r.reason != PINNED else ""  # not "(pinned, pinned)"
        lines.append(f"{name}: {r.id} {r.branch} ({r.reason}{pin}), "
                     f"objective {_fmt(r.objective)}{score}, beat {s['beat']} of {s['others']} other candidates; "
                     f"history {' '.join(s['history'])}")
    return "\n".join(lines)


def format_release(lineage: Lineage | dict, version: str, objective: Objective) -> str:
    """``raypath release RUN_DIR --version vK``: the candidates, best first, and the history."""
    import pandas as pd

    lineage = Lineage.of(lineage)
    h = lineage.release_history(version) or ReleaseHistory()
    live = h.live
    cands = candidates(lineage, version)
    d = decide(cands, live, objective, pinned=h.pinned)
    splits = [f"{kind}/{s}" for kind in ("val", "test") for s in objective.weights]
    rows = []
    for c in sorted(cands, key=lambda c: (d.scores[c.name] is None, d.scores[c.name] or 0.0)):
        ids = [r.id for r in h.releases if r.branch == c.name]
        mark = "*" if live is not None and c.name == live.branch else ""
        rows.append([mark, c.name, c.trial_id or "-", c.source, *(_fmt(c.metrics.get(s)) for s in splits),
                     _fmt(d.scores[c.name]), ",".join(ids) or "-"])
    weights = ", ".join(f"{s} {w:.3g}" for s, w in objective.weights.items())
    out = [f"candidates of {version} (score = objective over {weights}"
           + (f" + compute penalty {objective.compute_penalty:g}" if objective.compute_penalty else "")
           + "; * = live)"]
    out.append(pd.DataFrame(rows, columns=["", "branch", "trial", "source", *splits, "score", "releases"])
               .to_string(index=False) if rows else "(no finished branch yet)")
    out.append(f"\nreleases of {version} (live: {h.current or 'none'}"
               f"{', pinned' if h.pinned else ''})")
    for r in h.releases:
        out.append(f"  {r.id}  {r.released or '-'}  {r.reason:<10}  {r.branch}  "
                   f"objective {_fmt(r.objective)}  beat {r.beat} of "
                   f"{max((r.candidates or 1) - 1, 0)}  {r.path}")
    out.append("switches:" if h.log else "")
    for e in h.log:
        out.append(f"  {e.get('time', '-')}  {e['action']:<9} {e['release']}"
                   + (f" (replaced {e['replaced']})" if e.get("replaced") else ""))
    out.append(d.message)
    return "\n".join(out)

