"""Where the cache job's encoders come from: a local folder, or a hub repo pinned to one commit.

A hub revision is a name (`main`, a branch such as `fp16`, a tag) that can move. The cache job resolves
it to the commit it names once, before any model loads, and then loads every encoder at that commit: the
weights the tensors came from are the ones the fingerprint records (`cache_fingerprint.MODEL_COMMIT`), even if
the branch moves while the job runs, and a branch that has moved since makes the next run re-cache.

Resolution itself (`shared.hub_revision`) is shared with the trainer, which checks the commit it trains
against the one the cache records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from latentforge.shared.config import Config
from latentforge.shared.families import family_facts
from latentforge.shared.hub_revision import DEFAULT_REVISION, PIPELINE_MARKER, VAE_MARKER, resolve_commit
from latentforge.shared.model_check import folder_location, hub_location, model_location_doc


@dataclass(frozen=True)
class ModelSource:
    """One of `model.pretrained` / `model.vae`, resolved: a local folder, or a hub repo at a commit."""

    value: str  # as configured
    folder: str | None = None  # absolute path, for a local folder
    hub_id: str | None = None
    revision: str | None = None  # the configured revision (or "main"), for a hub repo
    commit: str | None = None  # the 40-hex commit `revision` named when resolved, for a hub repo

    @property
    def is_local(self) -> bool:
        return self.folder is not None

    @property
    def load_revision(self) -> str | None:
        """What to pass as `revision=` to `from_pretrained`: the resolved commit (None for a folder)."""
        return self.commit

    def location(self) -> dict[str, Any]:
        """The location hint cache.json keeps (`model_check.folder_location` / `hub_location`)."""
        if self.folder is not None:
            return folder_location(self.folder)
        assert self.hub_id is not None and self.revision is not None and self.commit is not None
        return hub_location(self.hub_id, self.revision, self.commit)


@dataclass(frozen=True)
class ModelSources:
    """The resolved sources of a run: the pipeline, and the separate VAE when `model.vae` names one."""

    pretrained: ModelSource
    vae: ModelSource | None = None

    def location(self) -> dict[str, Any]:
        """`CacheSpec.model_location`: where the encoders were loaded from (a hint, not fingerprinted)."""
        return model_location_doc(self.pretrained.location(), self.vae.location() if self.vae else None)


def is_local_folder(value: str) -> bool:
    """A local folder, as opposed to a hub id: the test `from_pretrained` itself makes (no `~` expansion)."""
    return os.path.isdir(value)


def resolve_source(value: str, revision: str | None, marker: str, key: str) -> ModelSource:
    """Resolve one configured model: a folder to its absolute path, a hub id to the commit `revision`
    (default main) names. A hub id that cannot be resolved is a one-line `ConfigError` naming `key`."""
    if is_local_folder(value):
        return ModelSource(value, folder=os.path.abspath(value))
    rev = revision or DEFAULT_REVISION
    return ModelSource(value, hub_id=value, revision=rev, commit=resolve_commit(value, rev, marker, key))


def resolve_model_sources(config: Config) -> ModelSources:
    """Resolve `model.pretrained` (at `model.revision`) and `model.vae`. A separate hub VAE is another repo,
    so the pipeline's revision does not apply to it: it is taken at its default branch."""
    pretrained = resolve_source(config.model.pretrained, config.model.revision, PIPELINE_MARKER, "model.pretrained")
    marker = family_facts(config.model.family).encoder_marker if config.model.family else VAE_MARKER
    vae = resolve_source(config.model.vae, None, marker, "model.vae") if config.model.vae else None
    return ModelSources(pretrained, vae)


def pinned_config(config: Config, sources: ModelSources) -> Config:
    """`config` with `model.revision` set to the resolved commit of a hub `model.pretrained`, so every
    encoder (the family text classes read `model.revision`) loads the very commit the fingerprint records."""
    if sources.pretrained.is_local or sources.pretrained.commit == config.model.revision:
        return config
    model = config.model.model_copy(update={"revision": sources.pretrained.commit})
    return config.model_copy(update={"model": model})
