"""The Hugging Face Hub as a :class:`~adapterhub_cli.stores.base.Store`: ``org/name[@ref]`` and ``hf://...``.

A version is a git tag (``v1.3.0``) on the Hub repo and is never moved; a ref resolves to a commit. Every call
takes the injected ``huggingface_hub.HfApi`` (its endpoint and token) or builds the default one, and uses only
public ``HfApi`` calls through :mod:`adapterhub_cli.stores.hf.client` (retries, errors naming repo and
revision). The token is passed to ``huggingface_hub`` and nowhere else: never printed, logged or carded.
``huggingface_hub`` is imported only when a Hub call runs, so ``import adapterhub_cli`` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.ref import HF_SCHEME, AdapterRef, Version, hub_ref
from adapterhub_cli.errors import UsageError
from adapterhub_cli.stores.base import Store
from adapterhub_cli.stores.hf import pull as hf_pull
from adapterhub_cli.stores.hf import push as hf_push
from adapterhub_cli.stores.hf import remote
from adapterhub_cli.stores.hf.client import Client, get_api, offline
from adapterhub_cli.stores.hf.resolve import resolve, versions
from adapterhub_cli.stores.records import PushResult, Resolved, VersionInfo
from adapterhub_cli.stores.views import fetched_adapter


if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.artifact.checkpoint import BaseView


class HfStore(Store):
    """The Hugging Face Hub (endpoint from ``HF_ENDPOINT`` or the injected ``HfApi``)."""

    name = "hf"
    description = "the Hugging Face Hub: ORG/NAME[@REF] or hf://ORG/NAME[@REF]"

    def __init__(self, api: HfApi | None = None, token: str | None = None, *, private: bool = False) -> None:
        self.api = api
        self.token = token
        self.private = private

    def configured(self, **options: Any) -> HfStore:
        """A Hub store with ``api`` (an ``HfApi``), ``token`` and ``private`` (for repos a push creates)."""
        return HfStore(
            options.get("api", self.api), options.get("token", self.token), private=options.get("private", False)
        )

    def _client(self, repo_id: str) -> Client:
        return Client(get_api(self.api), self.token, repo_id)

    def handles(self, ref: str) -> bool:
        text = ref.strip()
        if text.startswith(HF_SCHEME):
            return True
        try:
            return AdapterRef.parse(text).is_hub
        except UsageError:
            return False

    def parse(self, ref: str | AdapterRef) -> AdapterRef:
        return hub_ref(ref)

    def resolve(self, ref: str | AdapterRef) -> Resolved:
        return resolve(ref, api=self.api, token=self.token)

    def versions(self, ref: str) -> list[VersionInfo]:
        return versions(ref, api=self.api, token=self.token)

    def read_range(self, resolved: Resolved, name: str, start: int, length: int) -> bytes:
        return remote.read_range(self._client(resolved.repo_id), resolved, name, start, length)

    def fetch(self, resolved: Resolved, name: str) -> Path:
        return hf_pull.fetch_file(resolved, name, api=self.api, token=self.token)

    def publish(
        self,
        ref: str,
        files: Mapping[str, Path],
        *,
        version: Version,
        card: str | None,
        message: str | None = None,
        force: bool = False,
    ) -> PushResult:
        repo_id = self.parse(ref).repo_id
        assert repo_id is not None
        client = self._client(repo_id)
        head = hf_push.open_repo(client, repo_id, version, force=force, private=self.private)
        return hf_push.publish(client, repo_id, files, version=version, card=card, head=head, message=message)

    def previous_card(self, ref: str) -> str | None:
        repo_id = self.parse(ref).repo_id
        assert repo_id is not None
        client = self._client(repo_id)
        return hf_push.remote_card(client, repo_id, client.call("reading", "model_info", repo_id, files_metadata=True))

    def push(
        self,
        source: str | Path,
        ref: str,
        *,
        version: str,
        message: str | None = None,
        force: bool = False,
        base_model: str | None = None,
    ) -> PushResult:
        """As :meth:`Store.push`, and a repo without a local card keeps (and updates) its current card."""
        return hf_push.push(
            source,
            ref,
            version=version,
            api=self.api,
            token=self.token,
            private=self.private,
            message=message,
            force=force,
            base_model=base_model,
        )

    def open_adapter(self, ref: str | AdapterRef | Resolved, *, allow_pickle: bool = False) -> Adapter:
        """As :meth:`Store.open_adapter`; in offline mode (``HF_HUB_OFFLINE=1``) read from the HF cache."""
        resolved = ref if isinstance(ref, Resolved) else self.resolve(ref)
        if offline():
            return fetched_adapter(self, resolved, allow_pickle=allow_pickle)
        return super().open_adapter(resolved, allow_pickle=allow_pickle)

    def open_base(self, ref: str | AdapterRef | Resolved) -> BaseView:
        """As :meth:`Store.open_base`; in offline mode (``HF_HUB_OFFLINE=1``) the cached snapshot."""
        if offline():
            from adapterhub_cli.artifact.checkpoint import open_base

            target = AdapterRef(repo_id=ref.repo_id, revision=ref.commit) if isinstance(ref, Resolved) else ref
            return open_base(self.pull(target).path)
        return super().open_base(ref)
