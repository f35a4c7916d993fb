"""A small, realistic demo dataset built from the photographs that ship inside scikit-image.

Why real photos and not random noise: the cache job's whole point is VAE latents and text
embeddings, and latents of noise are meaningless (no structure for the trainer to learn, nothing to
eyeball in a sample grid) and they do not compress the way real latents do, so cache sizes and
throughput measured on noise lie. scikit-image's wheel already carries a dozen real photos, so the
demo needs no download.

Why this shape: ~28 samples cropped from 15 photos at aspect ratios from 1:3 to 3:1, some below the
training resolution (exercising the upscaler), RGBA cutouts, grayscale, one EXIF-rotated JPEG and two
captions longer than CLIP's 77 tokens -- every branch of bucketing and preprocessing gets hit while
the whole demo still runs on 2 CPU cores. The tar layout mimics img2dataset output, so the demo reads
the same code path as a real crawl; the folder copy exercises the image-folder reader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DemoDataSummary", "write_demo_data"]

MARKER = "demo_data.json"
_FORMAT_VERSION = 1  # bump when the table or encoding changes, so stale demo folders get rebuilt
_JPEG_QUALITY = 90
# img2dataset stores exif as a JSON string of exifread tag names; None when the photo had none.
_EXIF_JSON = {6: json.dumps({"Image Orientation": "Rotated 90 CW"})}
_JITTER_PX = 6  # the seed nudges crop offsets, so different seeds give genuinely different pixels


@dataclass(frozen=True)
class DemoDataSummary:
    """What `write_demo_data` produced; all paths are absolute."""

    root: Path
    shards: tuple[Path, ...]
    folder: Path
    num_samples: int
    keys: tuple[str, ...]
    seed: int


class _Shot(NamedTuple):
    slug: str
    source: str  # file name under skimage/data
    box: tuple[int, int, int, int]  # crop in source pixels; its ratio sets the sample's aspect ratio
    size: tuple[int, int] | None  # final stored (w, h) before any EXIF rotation; None keeps the crop
    fmt: str  # "jpg" | "png"
    mode: str  # "RGB" | "L" | "RGBA"
    subdir: str = ""  # folder-copy sub-directory, so recursive listing is exercised
    orientation: int = 1  # EXIF orientation; 6 = pixels stored rotated 90 degrees counter-clockwise


# Sizes are picked against a ~256x256 training area: most shorter sides are 256-600 px, six sit at
# 120-172 px on purpose (upscaler path). Grayscale textures are partly stored as RGB, as on the web.
_SHOTS: tuple[_Shot, ...] = (
    _Shot("astronaut-portrait", "astronaut.png", (0, 0, 512, 512), None, "jpg", "RGB"),
    _Shot("astronaut-face", "astronaut.png", (129, 0, 321, 256), (120, 160), "jpg", "RGB"),
    _Shot("astronaut-shuttle-model", "astronaut.png", (330, 0, 492, 288), None, "jpg", "RGB"),
    _Shot("chelsea-cat", "chelsea.png", (0, 0, 450, 300), None, "jpg", "RGB"),
    _Shot("chelsea-cutout", "chelsea.png", (90, 0, 390, 300), None, "png", "RGBA"),
    _Shot("chelsea-eyes", "chelsea.png", (100, 50, 400, 200), None, "jpg", "RGB"),
    _Shot("coffee-espresso", "coffee.png", (0, 0, 600, 400), None, "jpg", "RGB"),
    _Shot("coffee-cutout", "coffee.png", (75, 0, 475, 400), (320, 320), "png", "RGBA"),
    _Shot("coffee-cup-closeup", "coffee.png", (100, 0, 500, 300), None, "jpg", "RGB"),
    _Shot("rocket-launchpad", "rocket.jpg", (0, 0, 640, 427), None, "jpg", "RGB"),
    _Shot("rocket-tall", "rocket.jpg", (180, 0, 464, 427), None, "jpg", "RGB", orientation=6),
    _Shot("motorcycle-garage", "motorcycle_left.png", (0, 0, 741, 500), None, "jpg", "RGB"),
    _Shot("motorcycle-wide", "motorcycle_left.png", (0, 110, 740, 480), (640, 320), "jpg", "RGB"),
    _Shot("motorcycle-engine", "motorcycle_left.png", (270, 180, 530, 440), None, "jpg", "RGB"),
    _Shot("hubble-deep-field", "hubble_deep_field.jpg", (0, 155, 1000, 717), (768, 432), "jpg", "RGB"),
    _Shot("hubble-detail", "hubble_deep_field.jpg", (400, 300, 600, 500), (160, 160), "jpg", "RGB"),
    _Shot("hubble-tall", "hubble_deep_field.jpg", (300, 0, 790, 871), (324, 576), "jpg", "RGB"),
    _Shot("retina-fundus", "retina.jpg", (0, 0, 1411, 1411), (512, 512), "jpg", "RGB"),
    _Shot("retina-strip", "retina.jpg", (0, 470, 1410, 940), (960, 320), "jpg", "RGB"),
    _Shot("retina-tall", "retina.jpg", (470, 0, 940, 1410), (288, 864), "jpg", "RGB"),
    _Shot("ihc-tissue", "ihc.png", (0, 64, 512, 448), None, "jpg", "RGB"),
    _Shot("coins", "coins.png", (0, 0, 384, 303), None, "png", "L"),
    _Shot("cameraman", "camera.png", (0, 0, 384, 512), None, "jpg", "L"),
    _Shot("moon-surface", "moon.png", (0, 112, 512, 400), None, "jpg", "L"),
    _Shot("brick-wall", "brick.png", (128, 0, 384, 512), None, "jpg", "RGB", "textures"),
    _Shot("grass", "grass.png", (0, 128, 512, 384), None, "jpg", "RGB", "textures"),
    _Shot("gravel", "gravel.png", (0, 0, 320, 240), (160, 120), "jpg", "L", "textures"),
    _Shot("handwritten-math", "text.png", (0, 0, 448, 172), None, "jpg", "L"),
)

# Folder-copy samples whose caption lives in name.json instead of name.txt (both conventions exist).
_JSON_SIDECAR = frozenset({"coffee-cup-closeup", "hubble-tall", "cameraman"})

CAPTIONS: dict[str, str] = {
    "astronaut-portrait": (
        "a formal studio portrait of a smiling female astronaut with short wavy light brown hair, facing "
        "the camera in a bright orange pressure suit with a silver metal neck ring, a round embroidered "
        "mission patch on her chest and a small blue name tag with pilot wings, an american flag hanging "
        "in soft folds on the left, a white model of the space shuttle with its brown external tank and "
        "twin boosters on a dark pedestal at the upper right, and a black glossy helmet with a reflective "
        "visor resting in the lower right corner, against a mottled grey and beige photographic backdrop "
        "with even, soft lighting"
    ),
    "astronaut-face": "close-up of a smiling woman with short wavy light brown hair, the silver neck ring "
    "of an orange spacesuit just below her chin, grey studio backdrop",
    "astronaut-shuttle-model": "a model of the space shuttle launch stack, a white orbiter mounted on a "
    "brown external fuel tank between two white rocket boosters, on a dark stand against a grey backdrop",
    "chelsea-cat": "a tabby cat with orange and brown striped fur looking slightly to the side with large "
    "yellow-green eyes, white whiskers and a pink nose, soft beige background",
    "chelsea-cutout": "a tabby cat's face cut out in a soft-edged oval on a transparent background, "
    "yellow-green eyes, pink nose and white whiskers",
    "chelsea-eyes": "extreme close-up of a tabby cat's eyes, yellow-green irises with dark pupils above a "
    "pink nose, fine striped fur",
    "coffee-espresso": "top-down view of a single espresso in a glossy red-brown ceramic cup on a matching "
    "saucer with a small silver spoon, golden crema, on a worn wooden café table",
    "coffee-cutout": "a cup of espresso on a red saucer with a silver spoon, isolated in a soft oval on a "
    "transparent background",
    "coffee-cup-closeup": "looking down into a cup of espresso with smooth tan crema, the white inner rim "
    "of the cup, a silver teaspoon and the edge of a red saucer on a wooden table",
    "rocket-launchpad": "a white rocket standing on its launch pad at dusk between four steel lattice "
    "towers, deep blue twilight sky, floodlights with star-shaped flares along the horizon",
    "rocket-tall": "a tall white rocket with a rounded payload fairing on the launch pad at twilight, a "
    "lattice lightning tower on each side and sparkling floodlights at its base, deep blue sky",
    "motorcycle-garage": (
        "a red and black vintage yamaha cruiser motorcycle parked on its kickstand on a bare concrete "
        "garage floor, seen from its left side with the front wheel turned slightly toward the camera, "
        "chrome exhaust pipes, black spoked wheels, a round chrome headlight and orange turn signals, a "
        "long black quilted seat and a silver air-cooled engine with deep cooling fins; behind it a "
        "cluttered workshop with grey metal shelving stacked with cardboard boxes, a red plastic storage "
        "bin, bottles and tools, an old wooden bench and a child's bicycle against unfinished plywood "
        "walls, warm indoor lighting with soft shadows"
    ),
    "motorcycle-wide": "wide shot of a red vintage motorcycle with a black seat and chrome exhaust parked "
    "in a cluttered garage, metal shelves with cardboard boxes behind it",
    "motorcycle-engine": "close-up of a motorcycle's silver air-cooled engine with cooling fins, a round "
    "chrome engine cover and exhaust pipes below a red fuel tank",
    "hubble-deep-field": "the hubble deep field, hundreds of distant galaxies as tiny glowing spirals and "
    "smudges in white, orange and blue scattered across a black sky",
    "hubble-detail": "a small patch of deep space with a few faint galaxies and points of light in blue, "
    "white and orange on a black background",
    "hubble-tall": "a vertical slice of deep space packed with faint distant galaxies, spirals and "
    "elliptical blobs in white, gold and blue against pure black",
    "retina-fundus": "a color fundus photograph of a human retina, an orange-red circular field with dark "
    "red blood vessels branching from the bright optic disc on the left, a darker macula at the center, "
    "black corners",
    "retina-strip": "a wide horizontal band across a retinal fundus photograph, the bright optic disc at "
    "the left, dark red blood vessels curving across an orange background toward the darker macula",
    "retina-tall": "a narrow vertical strip of a retina photograph, thin red blood vessels branching over "
    "an orange-red background, fading to black at the top and bottom",
    "ihc-tissue": "microscope image of an immunohistochemistry stained tissue section, glandular structures "
    "with cell membranes stained brown and blue cell nuclei in pale connective tissue",
    "coins": "black and white photograph of twenty-four ancient coins laid out in four rows on a dark "
    "background, worn silver faces with portraits and figures",
    "cameraman": "black and white photo of a man in a dark coat looking through a camera mounted on a "
    "tripod in a grassy field, buildings on the distant horizon",
    "moon-surface": "grayscale close-up of the lunar surface, small craters and dark rough patches "
    "scattered across smooth grey terrain",
    "brick-wall": "a grey brick wall laid in a staggered running bond pattern, long narrow bricks with "
    "light mortar joints, black and white",
    "grass": "black and white close-up texture of a lawn, dense blades of grass and a few fallen leaves "
    "filling the frame",
    "gravel": "grayscale texture of small rounded gravel stones packed closely together, seen from above",
    "handwritten-math": "shallow depth of field photo of handwritten mathematical equations in dark pen "
    "on lined paper, fractions and letters slanting across the page, black and white",
}


def _skimage_data_dir() -> Path:
    # find_spec locates the package without importing it (importing skimage costs seconds).
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("demo data needs the photos shipped in scikit-image: pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _render(shot: _Shot, src: Image.Image, rng: random.Random) -> tuple[bytes, tuple[int, int]]:
    """Crop/resize/encode one sample; returns the encoded bytes and the pre-resize crop size."""
    left, top, right, bottom = shot.box
    w, h = right - left, bottom - top
    dx = min(max(rng.randint(-_JITTER_PX, _JITTER_PX), -left), src.width - right)
    dy = min(max(rng.randint(-_JITTER_PX, _JITTER_PX), -top), src.height - bottom)
    img = src.convert("L" if shot.mode == "L" else "RGB").crop((left + dx, top + dy, right + dx, bottom + dy))
    if shot.size is not None:
        img = img.resize(shot.size, Image.Resampling.LANCZOS)
    if shot.mode == "RGBA":
        # A soft oval cutout: real alpha gradients, the case a naive .convert("RGB") gets wrong.
        mask = Image.new("L", img.size, 0)
        inset = min(img.size) // 14
        ImageDraw.Draw(mask).ellipse((inset, inset, img.width - inset, img.height - inset), fill=255)
        img.putalpha(mask.filter(ImageFilter.GaussianBlur(min(img.size) / 24)))
    img.info = {}  # drop inherited ICC/text chunks; img2dataset re-encodes without them too
    buf = io.BytesIO()
    if shot.fmt == "png":
        img.save(buf, "PNG")
    else:
        exif = Image.Exif()
        if shot.orientation != 1:
            # Store pixels rotated CCW so only EXIF-aware readers (ImageOps.exif_transpose) see it upright.
            img = img.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = shot.orientation
        img.save(buf, "JPEG", quality=_JPEG_QUALITY, exif=exif.tobytes() if len(exif) else b"")
    return buf.getvalue(), (w, h)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: any mtime/owner drift would break byte-identical rebuilds.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _build(root: Path, samples_per_shard: int, seed: int) -> dict:
    """Write the dataset under `root` and return the marker record (paths relative to root)."""
    data_dir = _skimage_data_dir()
    rng = random.Random(seed)
    shots = list(_SHOTS)
    rng.shuffle(shots)  # the seed decides which photo lands in which shard, as a crawl order would
    sources: dict[str, Image.Image] = {}
    (root / "webdataset").mkdir()
    keys: list[str] = []
    shards: list[str] = []
    for shard_idx, start in enumerate(range(0, len(shots), samples_per_shard)):
        chunk = shots[start : start + samples_per_shard]
        shard_rel = f"webdataset/{shard_idx:05d}.tar"
        with tarfile.open(root / shard_rel, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, shot in enumerate(chunk):
                if shot.source not in sources:
                    with Image.open(data_dir / shot.source) as im:
                        sources[shot.source] = im.copy()  # closing `im` would invalidate its pixels
                data, (orig_w, orig_h) = _render(shot, sources[shot.source], rng)
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size  # stored pixels, before EXIF rotation (as img2dataset reports)
                if shot.orientation != 1:
                    orig_w, orig_h = width, height
                key = f"{shard_idx * 10000 + i:09d}"
                caption = CAPTIONS[shot.slug]
                meta = {
                    "key": key,
                    "caption": caption,
                    "url": f"https://example.invalid/photos/{shot.source.split('.')[0]}/{shot.slug}.{shot.fmt}",
                    "status": "success",
                    "error_message": None,
                    "width": width,
                    "height": height,
                    "original_width": orig_w,
                    "original_height": orig_h,
                    "exif": _EXIF_JSON.get(shot.orientation),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "aesthetic_score": round(rng.uniform(3.0, 7.0), 4),
                    "nsfw_probability": round(rng.uniform(0.0, 0.04), 5),
                }
                # Member order matches webdataset's TarWriter (extensions sorted within a sample).
                _tar_add(tar, f"{key}.{shot.fmt}", data)
                _tar_add(tar, f"{key}.json", _dump(meta))
                _tar_add(tar, f"{key}.txt", caption.encode("utf-8"))
                folder = root / "folder" / shot.subdir
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{shot.slug}.{shot.fmt}").write_bytes(data)
                if shot.slug in _JSON_SIDECAR:
                    (folder / f"{shot.slug}.json").write_bytes(_dump({"caption": caption}))
                else:
                    (folder / f"{shot.slug}.txt").write_bytes(caption.encode("utf-8"))
                keys.append(key)
        n = len(chunk)
        stats = {"count": n, "successes": n, "failed_to_download": 0, "status_dict": {"success": n}}
        (root / f"webdataset/{shard_idx:05d}_stats.json").write_bytes(_dump(stats))  # no timestamps
        shards.append(shard_rel)
    return {
        "format_version": _FORMAT_VERSION,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "num_samples": len(keys),
        "shards": shards,
        "folder": "folder",
        "keys": keys,
    }


def _summary(root: Path, record: dict) -> DemoDataSummary:
    return DemoDataSummary(
        root=root,
        shards=tuple(root / s for s in record["shards"]),
        folder=root / record["folder"],
        num_samples=int(record["num_samples"]),
        keys=tuple(record["keys"]),
        seed=int(record["seed"]),
    )


def _existing(root: Path, samples_per_shard: int, seed: int) -> tuple[bool, DemoDataSummary | None]:
    """(is_ours, summary if it is complete and matches the request)."""
    try:
        record = json.loads((root / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False, None
    wanted = {"format_version": _FORMAT_VERSION, "seed": seed, "samples_per_shard": samples_per_shard}
    if any(record.get(k) != v for k, v in wanted.items()):
        return True, None
    summary = _summary(root, record)
    return True, (summary if all(p.is_file() for p in summary.shards) else None)


def write_demo_data(
    out_dir: str | os.PathLike, *, samples_per_shard: int = 8, seed: int = 0
) -> DemoDataSummary:
    """Write the demo dataset (img2dataset-style tar shards + an image folder) into `out_dir`.

    Deterministic: the same `seed` and `samples_per_shard` give byte-identical files. If `out_dir`
    already holds a complete dataset written with the same arguments it is returned untouched. The
    dataset is built in a sibling temp folder and renamed into place, so a crash never leaves a
    half-written `out_dir`. An existing non-empty `out_dir` that is not a demo dataset is refused.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    root = Path(out_dir).absolute()
    ours, done = _existing(root, samples_per_shard, seed)
    if done is not None:
        return done
    if root.exists() and not ours and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not a demo dataset; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    old = None
    try:
        record = _build(tmp, samples_per_shard, seed)
        (tmp / MARKER).write_bytes(_dump(record))  # written last: its presence means "complete"
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, which would surprise anyone sharing the demo
        if ours:  # an older demo (other seed/format): move it aside so the swap is a single rename
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "data")
        elif root.is_dir():
            root.rmdir()  # empty by the check above; rename onto a directory is not portable
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _, done = _existing(root, samples_per_shard, seed)
        if done is not None:  # a concurrent writer finished the same dataset first; theirs is as good
            return done
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return _summary(root, record)
