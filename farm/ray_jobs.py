"""Submitting a job to a Ray cluster and waiting for its verdict, through Ray's
``JobSubmissionClient`` (the Jobs REST API) rather than by reading ``ray job`` output.

    python -m farm.ray_jobs submit --address http://127.0.0.1:8265 --submission-id ID \\
        [--env KEY=VALUE]... -- python jobs/tenant_sweep.py --config ...
    ray job logs --address ... --follow ID            # the log, as Ray prints it
    python -m farm.ray_jobs wait --address http://127.0.0.1:8265 ID

``submit`` uploads the current folder as the job's working dir. ``wait`` prints
``Job 'ID' succeeded`` (or ``failed``, ``stopped``, with Ray's message) and exits 0 only when
the job succeeded. Token authentication (``RAY_AUTH_MODE=token``) is Ray's own, read from the
environment by the client.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def submit(address: str, submission_id: str, entrypoint: list[str], env: dict[str, str],
           attempts: int = 15, pause_s: float = 2.0) -> str:
    """Submit ``entrypoint`` with the current folder as working dir; returns the submission id.

    A fresh head may not have registered its job agent yet; Ray then refuses the submission
    (and creates nothing), so it is retried for up to ``attempts`` x ``pause_s`` seconds.
    """
    from ray.job_submission import JobSubmissionClient

    last: Exception | None = None
    for _ in range(attempts):
        try:
            client = JobSubmissionClient(address)
            return client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=submission_id,
                                     runtime_env={"working_dir": ".", "env_vars": env})
        except (RuntimeError, ConnectionError) as exc:  # no agent yet, or the head is still starting
            if "No available agent" not in str(exc) and not isinstance(exc, ConnectionError):
                raise
            last = exc
            time.sleep(pause_s)
    raise RuntimeError(f"Ray did not accept job {submission_id} within {attempts * pause_s:.0f} s: {last}")


def wait(address: str, submission_id: str, timeout_s: float = 60.0) -> tuple[str, str | None]:
    """The job's terminal status (``SUCCEEDED``, ``FAILED``, ``STOPPED``) and Ray's message,
    waiting up to ``timeout_s`` for it (the log stream can end a moment before the status does)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if info.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return info.status.value, info.message
        if time.monotonic() > deadline:
            return info.status.value, f"still {info.status.value.lower()} after {timeout_s:.0f} s"
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.ray_jobs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="submit a job (working dir: this folder)")
    sub.add_argument("--address", required=True)
    sub.add_argument("--submission-id", required=True)
    sub.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an env var of the job")
    sub.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command to run")
    waiter = commands.add_parser("wait", help="wait for a job's verdict; exit 0 only when it succeeded")
    waiter.add_argument("--address", required=True)
    waiter.add_argument("--timeout", type=float, default=60.0)
    waiter.add_argument("submission_id")
    args = parser.parse_args(argv)
    if args.command == "submit":
        entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
        if not entrypoint:
            parser.error("submit: give the command after --")
        bad = [item for item in args.env if "=" not in item]
        if bad:
            parser.error(f"--env {bad[0]!r}: expected KEY=VALUE")
        env = dict(item.split("=", 1) for item in args.env)
        try:
            print(f"submitted job {submit(args.address, args.submission_id, entrypoint, env)}")
        except Exception as exc:  # Ray's refusal, named
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    status, message = wait(args.address, args.submission_id, args.timeout)
    verdict = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}.get(status)
    print(f"Job '{args.submission_id}' {verdict}" if verdict else f"Job '{args.submission_id}': {message}")
    if verdict != "succeeded" and message:
        print(message)
    return 0 if verdict == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
