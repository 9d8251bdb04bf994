"""The HTTP server (``latentdiff serve``): AUTOMATIC1111's ``/sdapi/v1`` API over the pipelines, with one queue
and one worker that batches compatible requests.

    schemas.py    request bodies (AUTOMATIC1111's field names) and Limits
    models.py     the loaded models, found by name only; sampler names
    jobs.py       a request checked against limits and model -> Job (what may share a generate call: Job.key)
    worker.py     the queue, the batching worker thread, progress, interrupt
    responses.py  AUTOMATIC1111's response bodies (base64 PNGs with parameters, the info JSON)
    service.py    ServeSettings and Service (models + worker + credentials of one process or Ray replica)
    app.py        create_app: the FastAPI app (routes, credentials, body limit, error answers)
    ray_app.py    the same app as a Ray Serve deployment

The pipelines know nothing of HTTP; fastapi and uvicorn come with the ``serve`` extra, ray with ``ray``.
"""
