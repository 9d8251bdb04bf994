"""Image sources and webdataset shards (img2dataset layout: ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``).

    image_sources.py          reading folders, archives and shards sample by sample (FID, CLIP score)
    sources.py, captions.py   image folders / archives and their captions (class templates or .txt files)
    writer.py, pack.py        deterministic, atomic shard writing; source -> shards + manifest.json
    manifest.py               per-shard sample count, size and sha256
    shards.py                 finding, counting and reading shards (the one grouping of tar members)
    plan.py, reader.py        the epoch plan and the resumable training reader (``make_dataloader``)
    decode.py, transforms.py  decoding (and the one image extension list); resize, crop, flip to tensors
    stats.py, validate.py     error accounting (``DataStats``) and validation against the manifest
    latents.py                latent caching (``cache_latents``)
"""
