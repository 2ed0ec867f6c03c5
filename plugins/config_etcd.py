"""Plugin ``config_etcd``: the config centre's ``etcd`` store (``sluice.control.config_store``).

::

    [config_store]
    store = "etcd"
    address = "http://127.0.0.1:2379"
    prefix = "/sluice/prod/"          # the document is the key /sluice/prod/config
    cache = "/var/lib/sluice/config-cache.json"
    # address = "https://etcd:2379": ca = "ca.pem" (default: the system's CAs), and for
    # etcd's --client-cert-auth, cert = "client.pem" and key = "client-key.pem"

Built on ``sluice.plugins.etcd`` (etcd's v3 JSON gateway over httpx, on trio): a read is a
range on the key; the watch is ``mirror_prefix`` on it, which watches on from the revision
after its read, resumes from the last revision after a disconnect (no change missed) and
reads the whole key again after a compaction; its ``stale`` state is our ``Lost``.

TLS files are loaded when the store is opened (at start, by ``sluice check`` and by
``sluice config``): one that does not load is a config error naming ``config_store.ca``,
``cert`` or ``key``. A handshake etcd's certificate fails (a wrong ``ca``) is the store
being unreachable, and its message names ``config_store.ca`` (``sluice config``: status 2).
"""

from __future__ import annotations

import trio

from sluice import ConfigError, hookimpl
from sluice.control.config_store import ConfigStore, Document, Lost, StoreUnavailable

from .etcd import EtcdClient, EtcdError, TlsFileError, tls_for, tls_hint

__all__ = ["EtcdConfigStore"]


class EtcdConfigStore(ConfigStore):
    """The document in the etcd key <prefix>config, watched from the revision after each read."""

    name = "etcd"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        try:
            self.tls = tls_for(self.url, settings.ca, settings.cert, settings.key)
        except TlsFileError as exc:
            raise ConfigError(f"config_store.{exc.key}: {exc}") from None

    def _client(self) -> EtcdClient:
        return EtcdClient(self.url, timeout=self.settings.timeout, tls=self.tls)

    @property
    def url(self) -> str:
        address = self.settings.address
        return address if "://" in address else f"http://{address}"

    @property
    def key(self) -> str:
        return f"{self.settings.prefix}config"

    @property
    def where(self) -> str:
        return f"etcd at {self.url}, key {self.key}"

    async def read(self) -> Document:
        try:
            async with self._client() as etcd:
                revision, kvs = await etcd.get_prefix(self.key)
        except EtcdError as exc:
            raise StoreUnavailable(tls_hint(exc, "config_store.")) from None
        return _document(revision, {kv.key: kv for kv in kvs}, self.key)

    async def write(self, data: bytes) -> int:
        try:
            async with self._client() as etcd:
                return await etcd.put(self.key, data)
        except EtcdError as exc:
            raise StoreUnavailable(tls_hint(exc, "config_store.")) from None

    async def watch(self, send: trio.MemorySendChannel) -> None:
        # The first read is ours, so that an unreachable etcd is an error to back off from
        # (mirror_prefix retries its first read quietly); then the mirror follows.
        await send.send(await self.read())
        async with self._client() as etcd, \
                etcd.mirror_prefix(self.key, max_backoff=self.settings.backoff_max) as states:
            async for state in states:
                if state.stale is not None:
                    await send.send(Lost(state.stale))
                else:
                    await send.send(_document(state.revision, state.kvs, self.key))


def _document(revision: int, kvs: dict, key: str) -> Document:
    kv = kvs.get(key.encode())
    if kv is None:
        return Document(revision, None)
    return Document(kv.mod_revision, kv.value)


@hookimpl
def sluice_config_stores():
    return [EtcdConfigStore]
