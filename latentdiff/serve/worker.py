"""One queue, one worker thread: requests (:class:`~latentdiff.serve.jobs.Job`) wait in a FIFO queue; the worker
takes the oldest and, with batching on, every waiting job with the same :attr:`Job.key` (model, kind, size, steps,
sampler, guidance scale, eta, img2img input and strength) that arrives within ``batch_window_s`` of it, up to
``max_batch`` images, and runs them as one ``pipe.generate`` call. Each image keeps its own prompt, negative
prompt and seed (``generate(seeds=[...])``: one random stream per image), so a request's images are the ones it
gets alone. VQ-Diffusion requests never share a call (its sampling is one random stream per call).

The worker also keeps AUTOMATIC1111's progress state (``/sdapi/v1/progress``), a preview of the running call's
first image, and handles ``/sdapi/v1/interrupt``: the running batch stops at its next step and its requests get
the images decoded from the last predicted x0 (as AUTOMATIC1111 returns the last latent); queued requests run on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from latentdiff.pipelines.base import decode_finite
from latentdiff.serve.jobs import Job, RequestError

log = logging.getLogger("latentdiff.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already (answered with 503 and Retry-After)."""


class _Interrupted(Exception):
    pass


class Worker:
    """The queue and the thread that runs it. ``on_done(job, error)`` is called from the worker thread when a job
    is finished (``error``: None, a :class:`RequestError`, or another exception)."""

    def __init__(self, max_batch: int = 8, batch_window_s: float = 0.05, batching: bool = True, max_queue: int = 64):
        if max_batch < 1 or batch_window_s < 0 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1, "
                             f"batch_window_s={batch_window_s} >= 0")
        self.max_batch, self.window, self.batching, self.max_queue = max_batch, batch_window_s, batching, max_queue
        self._pending: deque[tuple[Job, Callable]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._interrupt = False
        self._state = {"job_count": 0, "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "time_start": 0.0,
                       "job": "", "job_timestamp": "0"}
        self._preview = None  # (pipe, x0 (1, C, h, w), stamp) of the running call
        self._preview_png = (None, None)  # (stamp, PNG bytes)
        self.stats = {"generate_calls": 0, "requests": 0, "images": 0, "batched_requests": 0, "busy_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="latentdiff-serve-worker", daemon=True)
        self._thread.start()

    # -- the queue ---------------------------------------------------------------------------------------------
    def submit(self, job: Job, on_done: Callable) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` requests are waiting."""
        with self._cv:
            if self._stop:
                raise RuntimeError("the worker has stopped")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append((job, on_done))
            self._cv.notify_all()

    def queue_length(self) -> int:
        with self._cv:
            return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has room, estimated from the time per request so far (at least 1)."""
        per_request = self.stats["busy_seconds"] / max(1, self.stats["requests"])
        return max(1, math.ceil(per_request * self.queue_length() / (self.max_batch if self.batching else 1)))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, fail the queued jobs, end the thread."""
        with self._cv:
            self._stop = True
            left = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for job, on_done in left:
            on_done(job, RequestError("the server is shutting down", status=503))
        self._thread.join(timeout)

    def interrupt(self) -> None:
        """Stop the running batch at its next sampling step (nothing happens when none runs)."""
        with self._cv:
            if self._state["job_count"]:
                self._interrupt = True

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)

    def _take(self) -> list[tuple[Job, Callable]] | None:
        """The next batch: the oldest job plus (batching on) the waiting jobs with its key, up to max_batch images,
        after waiting up to batch_window_s from its arrival for more."""
        with self._cv:
            while not self._pending and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            head = self._pending[0][0]
            if self.batching:
                deadline = head.arrival + self.window
                while not self._stop and self._compatible_images(head) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            batch, total = [], 0
            for item in list(self._pending):
                job = item[0]
                if job is head or (self.batching and job.key == head.key and total + job.n_images <= self.max_batch):
                    batch.append(item)
                    total += job.n_images
                    self._pending.remove(item)
            self._interrupt = False
            return batch

    def _compatible_images(self, head: Job) -> int:
        return sum(job.n_images for job, _ in self._pending if job.key == head.key)

    # -- running a batch ---------------------------------------------------------------------------------------
    def _calls(self, jobs: list[Job]) -> list[list[tuple[Job, int]]]:
        """The generate calls of a batch: lists of (job, image index). Latent diffusion: all images in chunks of
        max_batch; VQ-Diffusion (one job): one call per iteration of batch_size images."""
        if jobs[0].model.is_vq:
            job = jobs[0]
            return [[(job, i) for i in range(s, s + job.batch_size)] for s in range(0, job.n_images, job.batch_size)]
        items = [(job, i) for job in jobs for i in range(job.n_images)]
        return [items[s:s + self.max_batch] for s in range(0, len(items), self.max_batch)]

    def _run(self, batch: list[tuple[Job, Callable]]) -> None:
        jobs = [job for job, _ in batch]
        calls = self._calls(jobs)
        first = jobs[0]
        with self._cv:
            self._state.update(job_count=len(calls), job_no=0, sampling_step=0, sampling_steps=0,
                               time_start=time.time(), job=f"{first.kind} {first.model.name}",
                               job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        error, start = None, time.monotonic()
        try:
            for no, items in enumerate(calls):
                with self._cv:
                    self._state.update(job_no=no, sampling_step=0)
                if not self._generate(first, items):
                    for job in jobs:
                        job.interrupted = True
                    break
        except ValueError as e:  # plan_job checks everything generate() checks; this is a safety net
            error = RequestError(str(e))
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
                log.exception("generation failed")
                error = e
            else:  # the server runs on; the client learns what to ask for instead
                log.warning("out of memory: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                error = RequestError("out of memory on the server for this request (and any batched with it): ask "
                                     "for fewer images per request (batch_size x n_iter), a smaller width x "
                                     "height, or retry later", status=503)
        except Exception as e:  # a fault of the server, not of the client: 500, and the worker runs on
            log.exception("generation failed")
            error = e
        finally:
            with self._cv:
                self._state.update(job_count=0, job_no=0, sampling_step=0, sampling_steps=0)
                self._preview = None
                self._interrupt = False
        self.stats["busy_seconds"] += time.monotonic() - start
        self.stats["generate_calls"] += len(calls)
        self.stats["requests"] += len(jobs)
        self.stats["images"] += sum(job.n_images for job in jobs)
        if len(jobs) > 1:
            self.stats["batched_requests"] += len(jobs)
        for job, on_done in batch:
            on_done(job, error)

    def _generate(self, first: Job, items: list[tuple[Job, int]]) -> bool:
        """Run one generate call and hand each image to its job; False when interrupted (the images decoded from
        the last predicted x0 are handed over, if a step ran)."""
        pipe, settings = first.model.pipe, first.settings
        prompts = [job.prompts[i] for job, i in items]
        negatives = [job.negatives[i] for job, i in items]
        seeds = [job.seeds[i] for job, i in items]
        stamp = [0]

        def callback(i, n, *tensors):
            with self._cv:
                self._state.update(sampling_step=i + 1, sampling_steps=n)
                if self._interrupt:
                    raise _Interrupted
                if len(tensors) == 2 and tensors[1] is not None:  # latent diffusion: (x_t, predicted x0)
                    stamp[0] += 1
                    self._preview = (pipe, tensors[1].detach().clone(), (id(items), stamp[0]))

        seed_kw = {"seed": seeds[0]} if first.model.is_vq else {"seeds": seeds}
        finished = True
        try:
            images, params = pipe.generate(prompts, negative_prompt=negatives, callback=callback, **seed_kw,
                                           **settings)
        except _Interrupted:
            finished, preview = False, self._preview
            if preview is None or first.model.is_vq:
                return False
            with torch.inference_mode():  # the last predicted x0, decoded as generate() decodes
                images = decode_finite(pipe.decode_latents, preview[1].to(pipe.dtype), pipe.autoencoder)
            params = [_params(first, p, n, s) for p, n, s in zip(prompts, negatives, seeds)]
        finite = torch.isfinite(images).flatten(1).all(1).tolist()  # (N,)
        for (job, _), image, p, ok in zip(items, images, params, finite):
            if ok:
                job.results.append((image, p))
            else:  # never a black or garbage PNG: the image is left out
                log.warning("image with seed %d has NaN or inf pixels even decoded in float32: left out", p.seed)
        return finished

    # -- progress ----------------------------------------------------------------------------------------------
    def progress(self) -> dict:
        """AUTOMATIC1111's ``/sdapi/v1/progress`` body, without ``current_image``."""
        with self._cv:
            s = dict(self._state)
            interrupted = self._interrupt
        state = {"skipped": False, "interrupted": interrupted, "stopping_generation": False, "job": s["job"],
                 "job_count": s["job_count"], "job_timestamp": s["job_timestamp"], "job_no": s["job_no"],
                 "sampling_step": s["sampling_step"], "sampling_steps": s["sampling_steps"]}
        if not s["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        # AUTOMATIC1111's estimate (modules/api/api.py progressapi)
        progress = 0.01 + s["job_no"] / s["job_count"]
        if s["sampling_steps"]:
            progress += s["sampling_step"] / s["sampling_steps"] / s["job_count"]
        elapsed = time.time() - s["time_start"]
        eta_relative = elapsed / progress - elapsed
        return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state, "current_image": None,
                "textinfo": None}

    def preview_png(self) -> bytes | None:
        """The running call's first image decoded from its latest predicted x0, as PNG bytes (None when idle or
        for VQ-Diffusion); decoded once per step however often it is asked for."""
        from latentdiff.io.images import png_bytes, to_pil

        preview = self._preview
        if preview is None:
            return None
        pipe, x0, stamp = preview
        cached = self._preview_png
        if cached[0] == stamp:
            return cached[1]
        with torch.inference_mode():
            image = pipe.autoencoder.decode(x0[:1].to(pipe.dtype)).float()  # (1, 3, H, W)
        data = png_bytes(to_pil(image)[0])
        self._preview_png = (stamp, data)
        return data


def _params(job: Job, prompt: str, negative: str, seed: int):
    """The GenerationParams of an image cut short by an interrupt (what generate() would have recorded)."""
    from latentdiff.io.images import GenerationParams

    s, pipe = job.settings, job.model.pipe
    return GenerationParams(prompt, negative, s["steps"], s["sampler"], s["scale"], seed, s["width"], s["height"],
                            s["eta"], pipe.name, s.get("strength"), model_hash=pipe.model_hash)
