"""How bin/bench runs its measurements: per storage, an untimed warm-up of every contender, then
``--repeats`` rounds of every workload with the contenders interleaved (so a slow minute of the
machine is shared between them, not paid by one)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .bench_fleet import Fleet, Orchestrator
from .bench_plan import log
from .bench_probes import MemorySampler
from .bench_results import Results
from .jobs import workload_spec


class Runner:
    def __init__(self, opts: argparse.Namespace, workdir: Path, fleet: Fleet, results: Results) -> None:
        self.opts = opts
        self.workdir = workdir
        self.fleet = fleet
        self.results = results

    def run_once(
        self, orchestrator: Orchestrator, storage: str, workload: str, record: bool = True, sample_memory: bool = False
    ) -> float:
        contender = orchestrator.contender
        sampler = None
        if sample_memory and contender in self.fleet.worker_pids:
            sampler = MemorySampler(self.fleet.worker_pids[contender])
            sampler.start()
        probes = self.fleet.probes(contender)
        probes.before()
        answer = orchestrator.run(workload, self.fleet.run_config[contender])
        probes.after()
        if sampler is not None:
            self.results.record_memory(storage, contender, *sampler.stop())
        if not answer["success"]:
            raise RuntimeError(
                f"{contender} run {answer['run_id']} of {workload} on {storage} did not succeed; "
                f"see its event log in {self.workdir}/home-{storage}"
            )
        if record:
            self.results.record(storage, workload, contender, answer, probes)
        return answer["wall"]

    def run_storage(self, storage: str) -> None:
        home = self.fleet.make_home(storage)
        workers = self.fleet.start_workers(home)
        orchestrators = self.fleet.orchestrators(home)
        try:
            log(f"\n== {storage}: warm-up (untimed) ==")
            for contender in self.opts.contenders:
                for job in self.warm_up_jobs(contender):
                    wall = self.run_once(orchestrators[contender], storage, job, record=False)
                    log(f"  warm-up {job:<22} {contender:<15} {wall:7.2f} s")
            log(f"== {storage}: {self.opts.repeats} repeat(s), contenders interleaved ==")
            for repeat in range(self.opts.repeats):
                self._round(orchestrators, storage, repeat)
        finally:
            self.fleet.stop(orchestrators, workers)

    def _round(self, orchestrators: dict[str, Orchestrator], storage: str, repeat: int) -> None:
        """One timed run of every workload by every contender not skipped."""
        for workload in self.opts.workloads:
            for contender in self.opts.contenders:
                if (workload, contender) in self.results.skipped:
                    continue
                memory = workload.startswith("fanout") and not workload.endswith("sleep")
                wall = self.run_once(orchestrators[contender], storage, workload, sample_memory=memory)
                log(f"  #{repeat + 1} {workload:<22} {contender:<15} {wall:7.2f} s")
                self.results.save_progress(self.workdir)

    def warm_up_jobs(self, contender: str) -> list[str]:
        """One untimed run of each job the contender's measurements use (so workers hold its
        plan and step children are up); --quick warms up the first workload only. Nothing stays
        warm between multiprocess runs (a process per step)."""
        if contender == "multiprocess":
            return []
        jobs: list[str] = []
        for workload in self.opts.workloads[:1] if self.opts.quick else self.opts.workloads:
            if (workload, contender) not in self.results.skipped:
                jobs.extend(job for job in workload_spec(workload).jobs if job not in jobs)
        return jobs
