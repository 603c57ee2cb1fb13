"""The OCI (Docker v2) registry client, as Ollama speaks to registries.

``llama3.2:1b`` is ``registry.ollama.ai/library/llama3.2:1b``; ``host/namespace/model:tag``
names any other registry. GET the manifest (Docker v2), then each blob it names (the
layers, then the config). A registry that answers 401 with a ``Bearer`` challenge gets
asked for an anonymous token at the realm it names (the service and scope it gives), and
the request is made again with it. ``https`` always, ``http`` when the caller says
``insecure`` (a registry on the LAN).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from nodes.errors import InvalidRequest, ModelNotFound, PullFailed
from nodes.pull.transfer import Opener, describe
from nodes.store import MANIFEST_TYPE, MODEL_TYPE, ModelRef, normal_digest

OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryClient:
    """One repository of a registry's v2 API, with the Bearer-token challenge handled."""

    def __init__(self, ref: ModelRef, insecure: bool) -> None:
        self.ref = ref
        self.insecure = insecure
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.registry_path}"
        self._token: str | None = None

    async def manifest(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """The manifest of the model's tag; ModelNotFound or PullFailed saying why not."""
        accept = {"Accept": f"{MANIFEST_TYPE}, {OCI_MANIFEST_TYPE}"}
        try:
            response = await self.get(client, f"/manifests/{self.ref.tag}", accept)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            hint = "" if self.insecure else "; a registry that speaks plain http needs insecure"
            raise PullFailed(
                f"Cannot reach the registry {self.ref.host}: {describe(exc)}. Check the name "
                f"and the network{hint}."
            ) from None
        status = response.status_code
        if status == 404:
            raise ModelNotFound(self.ref.display)
        if status in (401, 403):
            raise PullFailed(
                f"The registry {self.ref.host} refused {self.ref.display} ({status}): the "
                f"model is private, or its name is misspelt."
            )
        if status != 200:
            raise PullFailed(
                f"The registry {self.ref.host} answered {status} for the manifest of "
                f"{self.ref.display}."
            )
        try:
            return json.loads(body)
        except ValueError:
            raise PullFailed(
                f"The registry {self.ref.host} sent a manifest of {self.ref.display} that is "
                f"not JSON."
            ) from None

    def opener(self, path: str) -> Opener:
        """An ``Opener`` of ``base + path`` (a blob), logging in as ``get`` does."""

        async def open_(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
            return await self.get(client, path, headers)

        return open_

    async def get(
        self, client: httpx.AsyncClient, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        """A streamed GET of ``base + path``; one 401 challenge is answered with a token."""
        response = await self._send(client, path, headers)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate", "")
        await response.aclose()
        self._token = await self._login(client, challenge)
        return await self._send(client, path, headers)

    async def _send(
        self, client: httpx.AsyncClient, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        if self._token:
            headers = {**headers, "Authorization": f"Bearer {self._token}"}
        request = client.build_request("GET", self.base + path, headers=headers)
        return await client.send(request, stream=True)

    async def _login(self, client: httpx.AsyncClient, challenge: str) -> str:
        """An anonymous token from the realm a ``Bearer`` challenge names (as Ollama asks)."""
        scheme, fields = parse_challenge(challenge)
        if scheme != "bearer" or not fields.get("realm"):
            raise PullFailed(
                f"The registry {self.ref.host} wants a login ({challenge or 'no challenge'}); "
                f"Corral pulls only models anyone may pull."
            )
        params = {"scope": fields.get("scope") or f"repository:{self.ref.registry_path}:pull"}
        if fields.get("service"):
            params["service"] = fields["service"]
        try:
            response = await client.get(fields["realm"], params=params)
            token = response.json().get("token") or response.json().get("access_token")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise PullFailed(f"Getting a token from {fields['realm']} failed: {exc}.") from None
        if response.status_code != 200 or not token:
            raise PullFailed(
                f"{fields['realm']} gave no token to pull {self.ref.display} "
                f"({response.status_code}): the model is private, or its name is misspelt."
            )
        return token


def blobs_of(manifest: Any, name: str) -> list[tuple[str, int]]:
    """(digest, size) of every blob of an Ollama manifest: its layers, then its config."""
    try:
        layers = manifest["layers"]
        blobs = [
            (normal_digest(x["digest"]), int(x["size"])) for x in [*layers, manifest["config"]]
        ]
        has_model = any(x.get("mediaType") == MODEL_TYPE for x in layers)
    except (KeyError, TypeError, ValueError, AttributeError, InvalidRequest):
        raise PullFailed(
            f"The manifest of {name} is not an image manifest Corral understands."
        ) from None
    if not has_model:
        raise PullFailed(f"{name} is not an Ollama model: its manifest has no {MODEL_TYPE} layer.")
    if any(size < 0 for _, size in blobs):
        raise PullFailed(f"The manifest of {name} gives a negative size.")
    return blobs
