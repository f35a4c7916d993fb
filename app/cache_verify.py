"""`latentforge inspect --verify`: read every committed group in full and check it.

Independent of the trainer's reader: arrays are read through zarr-python. Checks shapes, row counts,
dtypes (and the bfloat16 marker), NaN/Inf in float fields, negative std, the recorded sizes (target ==
bucket, original > 0, crop inside the cover-resized image), upscale codes, keys, the prompts group, the
fingerprint, and every file's size and crc32 (`CacheReader.verify`). One problem per line, naming the
file and the shard.
"""

from __future__ import annotations

from typing import Any

_FLOAT_DTYPES = ("bfloat16", "float16", "float32")

def _as_float(block: Any, dtype: str) -> Any:
    import numpy as np

    if dtype == "bfloat16":  # stored as the raw bits: widen to float32 exactly
        return (np.asarray(block, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(block)


def _rows_text(rows: Any, keys: Any) -> str:
    rows = [int(r) for r in rows]
    shown = rows[:3]
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    named = ""
    if keys is not None:
        named = " (key " + ", ".join(str(keys[r]) for r in shown if r < len(keys)) + ")"
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, shown))}{more}{named}"


def verify_cache(reader: Any) -> list[str]:
    """Every problem found, one line each, naming the file and the shard (group) it is in."""
    from latentforge.shared.cache_fingerprint import compute_fingerprint

    problems: list[str] = []
    spec = reader.spec
    if spec.fingerprint_inputs and compute_fingerprint(spec.fingerprint_inputs) != spec.fingerprint:
        problems.append(f"{reader.storage.path('cache.json')}: fingerprint does not match fingerprint_inputs "
                        "(the file was edited); re-run the cache job")
    problems.extend(reader.verify(checksums=True))
    for g in reader.groups:
        for name, count in sorted(g.bucket_counts.items()):
            problems.extend(_verify_bucket(reader, g.group_id, name, int(count)))
    problems.extend(_verify_prompts(reader))
    return problems


def _verify_bucket(reader: Any, group_id: str, name: str, count: int) -> list[str]:
    import numpy as np
    import zarr

    from latentforge.preprocess.buckets import plan_crop
    from latentforge.shared.cache_format import SHARDS_DIR, UPSCALE_METHODS, decode_keys, parse_bucket_name

    spec = reader.spec
    bucket = parse_bucket_name(name)
    problems: list[str] = []
    small: dict[str, Any] = {}
    where = f"(shard {group_id})"

    def path(field: str) -> str:
        return reader.storage.path(f"{SHARDS_DIR}/{group_id}/{name}/{field}")

    # Keys first, so problems can name the samples.
    keys = raw_keys = None
    if "key" in {f.name for f in spec.fields}:
        try:
            raw_keys = zarr.open_array(reader.storage.zarr_store(f"{SHARDS_DIR}/{group_id}/{name}/key",
                                                                 read_only=True), mode="r")[:]
        except Exception:  # reported below with the field
            raw_keys = None
    if raw_keys is not None:
        try:
            keys = decode_keys(raw_keys)
        except ValueError as exc:
            problems.append(f"{path('key')}: keys are not zero-padded UTF-8 ({str(exc)[:120]}) {where}")
    for field in spec.fields:
        rel = f"{SHARDS_DIR}/{group_id}/{name}/{field.name}"
        expected = (count, *field.row_shape(bucket, spec.vae_downsample))
        try:
            arr = zarr.open_array(reader.storage.zarr_store(rel, read_only=True), mode="r")
        except Exception as exc:  # any failure to open is a finding, not a crash
            problems.append(f"{path(field.name)}: cannot open ({exc.__class__.__name__}: {str(exc)[:120]}) {where}")
            continue
        if tuple(arr.shape) != expected:
            problems.append(f"{path(field.name)}: shape {tuple(arr.shape)}, expected {expected} {where}")
            continue
        if np.dtype(arr.dtype) != np.dtype(field.storage_dtype):
            problems.append(f"{path(field.name)}: dtype {arr.dtype}, expected {field.storage_dtype} "
                            f"({field.dtype}) {where}")
            continue
        if field.dtype in ("bfloat16", "utf8") and arr.attrs.get("logical_dtype") != field.dtype:
            problems.append(f"{path(field.name)}: missing attributes.logical_dtype = {field.dtype} {where}")
        step = int((arr.shards or arr.chunks)[0]) if arr.ndim else count
        nan_rows: list[int] = []
        n_nan = n_inf = n_neg = 0
        whole = []
        try:
            for start in range(0, count, max(step, 1)):
                block = arr[start:start + step]
                if field.dtype in _FLOAT_DTYPES:
                    vals = _as_float(block, field.dtype)
                    nan, inf = np.isnan(vals), np.isinf(vals)
                    n_nan, n_inf = n_nan + int(nan.sum()), n_inf + int(inf.sum())
                    bad = (nan | inf).reshape(len(vals), -1).any(axis=1)
                    nan_rows.extend((np.nonzero(bad)[0] + start).tolist())
                    if field.name == "latent_std":
                        n_neg += int((vals < 0).sum())
                elif not field.per_row(bucket, spec.vae_downsample):
                    whole.append(np.asarray(block))
        except Exception as exc:  # a corrupt chunk is a finding
            problems.append(f"{path(field.name)}: unreadable ({exc.__class__.__name__}: {str(exc)[:120]}) {where}")
            continue
        if nan_rows:
            problems.append(f"{path(field.name)}: {n_nan} NaN and {n_inf} Inf values in "
                            f"{_rows_text(nan_rows, keys)} {where}")
        if n_neg:
            problems.append(f"{path(field.name)}: {n_neg} negative standard deviations {where}")
        if whole:
            small[field.name] = np.concatenate(whole) if len(whole) > 1 else whole[0]

    th, tw = bucket
    if "target_size" in small:
        bad = np.nonzero((small["target_size"] != np.array(bucket)).any(axis=1))[0]
        if bad.size:
            problems.append(f"{path('target_size')}: {_rows_text(bad, keys)} record "
                            f"{tuple(int(v) for v in small['target_size'][bad[0]])}, not the bucket {name} {where}")
    if "original_size" in small:
        orig = small["original_size"]
        bad = np.nonzero((orig <= 0).any(axis=1))[0]
        if bad.size:
            problems.append(f"{path('original_size')}: non-positive size in {_rows_text(bad, keys)} {where}")
        if "crop_top_left" in small:
            crop = small["crop_top_left"]
            resized = np.zeros_like(orig)
            for size in np.unique(orig, axis=0):
                if (size > 0).all():
                    resized[(orig == size).all(axis=1)] = plan_crop(int(size[0]), int(size[1]), bucket, "center").resized
            valid = (orig > 0).all(axis=1)
            outside = valid & ((crop < 0).any(axis=1) | (crop[:, 0] + th > resized[:, 0]) | (crop[:, 1] + tw > resized[:, 1]))
            bad = np.nonzero(outside)[0]
            if bad.size:
                r = int(bad[0])
                problems.append(f"{path('crop_top_left')}: crop outside the resized image in {_rows_text(bad, keys)}: "
                                f"{th}x{tw} at {tuple(int(v) for v in crop[r])} in {tuple(int(v) for v in resized[r])} {where}")
    if "upscale_method" in small:
        bad = np.nonzero(~np.isin(small["upscale_method"], list(UPSCALE_METHODS.values())))[0]
        if bad.size:
            problems.append(f"{path('upscale_method')}: unknown codes in {_rows_text(bad, keys)} {where}")
    if keys is not None and len(keys) == count:
        bad = np.nonzero(np.array([not str(k) for k in keys], dtype=bool))[0]
        if bad.size:
            problems.append(f"{path('key')}: empty sample keys in {_rows_text(bad, None)} {where}")
    return problems


def _verify_prompts(reader: Any) -> list[str]:
    import torch

    where = reader.storage.path("prompts")
    try:
        empty, prompts, validation = reader.prompts()
    except Exception as exc:  # unreadable prompts are a finding
        return [f"{where}: unreadable ({exc.__class__.__name__}: {str(exc)[:160]})"]
    problems = []
    for part, fields in (("empty", empty), ("validation", validation)):
        for name, value in fields.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value.float()).all():
                problems.append(f"{where}/{part}/{name}: NaN or Inf values")
    if validation and len(prompts) != next(iter(validation.values())).shape[0]:
        problems.append(f"{where}: {len(prompts)} validation prompts but {next(iter(validation.values())).shape[0]} rows")
    return problems


# ---- the command -----------------------------------------------------------------------------------------
