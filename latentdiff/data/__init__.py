"""Webdataset shards (img2dataset layout: ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``).

    sources.py, captions.py   image folders / archives and their captions (class templates or .txt files)
    writer.py, pack.py        deterministic, atomic shard writing; source -> shards + manifest.json
    manifest.py               per-shard sample count, size and sha256
    shards.py                 finding, counting and reading shards
    plan.py, reader.py        the epoch plan and the resumable training reader (``make_dataloader``)
    decode.py, transforms.py  decoding; resize, crop, flip to tensors
    stats.py, validate.py     error accounting (``DataStats``) and validation against the manifest
    latents.py                latent caching (``cache_latents``)
"""
