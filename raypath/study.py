"""A sweep's Optuna study, kept in Optuna's own storage next to the sweep.

Ray's :class:`~ray.tune.search.optuna.OptunaSearch` keeps its study in memory by
default, and Tune pickles it inside the searcher's private state
(``searcher-state-*.pkl``). A sweep gives it an Optuna
:class:`~optuna.storages.JournalStorage` on ``SWEEP_DIR/optuna.journal`` instead:
every proposal and result is appended there as it happens, and :func:`load_study`
(``optuna.load_study``) reads the study of a finished, interrupted or running sweep
for Optuna's own tools (``study.trials_dataframe()``, ``optuna.visualization``).

Tune still pickles the searcher, storage included, to resume a sweep.
:class:`SweepSearch` makes the restored one consistent with the journal:

* it re-opens the journal of the sweep directory being resumed (:func:`resuming`),
  so a moved or copied sweep continues its own study, never the one it was copied from;
* a trial the journal holds as running but the restored searcher does not know (proposed
  after Tune's last experiment checkpoint, before a crash) is failed, and a law-guided
  point it had taken from the queue is queued again.

A trial that errored is failed in the journal (Optuna cannot reopen a finished trial). Re-running
the sweep retries it under the same Tune trial id; Tune's ``ConcurrencyLimiter`` drops the
retry's result, since the trial already finished for it. :class:`RetryingLimiter` passes it on,
and :class:`SweepSearch` records it as a new completed trial with the same parameters
(``retry_of``: the failed one's number), so the study, and TPE's next proposals, hold it.

Sweeps written before the journal have none: :func:`load_study` says so
(:class:`NoJournalError`), and they still resume with the study Tune pickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from raypath.mirror import SWEEP_OWN

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"

#: The sweep directory whose Tune experiment is being restored (set by :func:`resuming`).
_RESUMING: ContextVar[Path | None] = ContextVar("raypath_resuming_sweep", default=None)


class NoJournalError(FileNotFoundError):
    """A sweep directory without ``optuna.journal`` (written before sweeps kept one, or not a sweep)."""


def journal_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / JOURNAL


class _Journal(JournalFileBackend):
    """The journal file of one sweep, re-pointed by :meth:`reopen` at a resumed sweep's own."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(str(path))
        self.path = str(path)

    def reopen(self, path: str | os.PathLike) -> None:
        if str(path) != self.path:
            log.info("the sweep moved: its Optuna study continues in %s (was %s)", path, self.path)
            self.__init__(path)


def load_study(sweep_dir: str | os.PathLike) -> optuna.Study:
    """The Optuna study of a sweep, from its journal (read only; a running sweep may append to it)."""
    path = journal_path(sweep_dir)
    if not path.is_file():
        if any(Path(sweep_dir).glob("searcher-state-*.pkl")):
            raise NoJournalError(f"{sweep_dir}: this sweep predates {JOURNAL} (its Optuna study lives only "
                                 f"inside Tune's searcher state); its trials are in {Path(sweep_dir) / 'results.json'}")
        raise NoJournalError(f"{sweep_dir}: no {JOURNAL} (not a raypath sweep directory?)")
    storage = JournalStorage(JournalFileBackend(str(path)))
    names = optuna.get_all_study_names(storage)  # one: the sweep's
    return optuna.load_study(study_name=names[0] if len(names) == 1 else None, storage=storage)


def discard(sweep_dir: str | os.PathLike) -> None:
    """Remove the journal of a sweep that is started anew (Tune kept nothing to resume)."""
    path = journal_path(sweep_dir)
    if path.is_file():
        log.warning("%s: Tune kept no state of this sweep to resume; its Optuna study starts anew", sweep_dir)
        path.unlink()


def resuming_dir() -> Path | None:
    """The sweep directory of the ``Tuner.fit()`` that :func:`resuming` surrounds (None outside
    one): where the objects Tune restores from the sweep's pickles must read and write now."""
    return _RESUMING.get()


@contextlib.contextmanager
def resuming(sweep_dir: str | os.PathLike) -> Iterator[None]:
    """Around the ``Tuner.fit()`` of a restored sweep: the searcher Tune restores in it re-opens
    the journal in ``sweep_dir`` (where the sweep is now, maybe not where it started)."""
    token = _RESUMING.set(Path(sweep_dir))
    try:
        yield
    finally:
        _RESUMING.reset(token)


class SweepSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` on the journal in ``sweep_dir`` (the other arguments are its own)."""

    def __init__(self, sweep_dir: str | os.PathLike, **kwargs):
        self._journal = _Journal(journal_path(sweep_dir))
        super().__init__(storage=JournalStorage(self._journal), **kwargs)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        here = resuming_dir()
        if here is not None:
            self._journal.reopen(journal_path(here))
        self._settle_unknown_trials()

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Save the searcher into Tune's driver staging directory, then delete the sweep's own
        records there (:data:`raypath.mirror.SWEEP_OWN`): Tune uploads that directory to the sweep
        right after, at every experiment checkpoint.

        A restored Tune (Ray 2.60) downloads every top-level ``*.json`` of the experiment directory
        into it: a record the sweep wrote since (a trial pruned, one stopped) was put back as the
        restore found it, and as the directory is named after the experiment's first start, a copy
        of the sweep restored before in the same Ray session handed this one its records."""
        super().save_to_dir(checkpoint_dir, session_str)
        for name in SWEEP_OWN:
            (Path(checkpoint_dir) / name).unlink(missing_ok=True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:  # a retry's progress cannot go to its failed trial
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials and not error and result and result.get(self.metric) is not None:
            self._record_retry(trial_id, result[self.metric])
        else:
            super().on_trial_complete(trial_id, result, error)

    def _record_retry(self, trial_id: str, value: float) -> None:
        failed = self._ot_trials[trial_id]
        if next(t.state for t in self._ot_study.get_trials(deepcopy=False) if t.number == failed.number) \
                != TrialState.FAIL:
            return  # a second completion of a trial that completed: Ray's warning case, nothing to add
        self._ot_study.add_trial(optuna.trial.create_trial(
            params=failed.params, distributions=failed.distributions, value=value,
            user_attrs={"retry_of": failed.number, "tune_trial_id": trial_id}))
        log.info("sweep trial %s finished on a retry: Optuna trial %d failed, its result is a new trial",
                 trial_id, failed.number)

    def _settle_unknown_trials(self) -> None:
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in known:
                continue
            self._ot_study.tell(t.number, state=TrialState.FAIL)
            fixed = t.system_attrs.get("fixed_params")
            if fixed:
                self._ot_study.enqueue_trial(fixed)
            log.warning("Optuna trial %d was proposed after the sweep's last saved state; failed it%s",
                        t.number, " and queued its point again" if fixed else "")


class RetryingLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` that passes on the result of a retried errored trial (which
    it no longer counts as live) instead of dropping it; the searcher decides what to keep."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials:
            super().on_trial_complete(trial_id, result, error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
