#!/usr/bin/env python3
"""Builds a one-layer OCI image from files of this machine and pushes it to a plain-HTTP registry.

    oci-image.py HOST:PORT REPOSITORY TAG KIND

KIND is one of
    busybox     Debian's static busybox at /bin/busybox, with links for sh, true, sleep, cat, ls, cp
    pause       the same binary, started as `sleep` for ever: the CRI sandbox ("pause") image
    distroless  one data file, /hello: no shell and no binary at all, like a distroless image

Layers are deterministic (sorted entries, mtime 0, gzip without a timestamp), so the same KIND gives
the same digest on every machine with the same busybox. Prints the manifest digest. Standard library
only: the harness runs it before anything else is built.
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile
import urllib.request

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "true", "sleep", "cat", "ls", "cp")


def entries(kind):
    """(path, kind, payload) of the layer, in order."""
    if kind in ("busybox", "pause"):
        with open(BUSYBOX, "rb") as f:
            binary = f.read()
        yield "bin", "dir", None
        yield "bin/busybox", "exe", binary
        for applet in APPLETS if kind == "busybox" else ("sleep",):
            yield f"bin/{applet}", "link", "busybox"
    elif kind == "distroless":
        yield "hello", "file", b"a file, and nothing that could run\n"
    else:
        raise SystemExit(f"unknown kind {kind!r}: busybox, pause or distroless")


def layer(kind):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, what, payload in entries(kind):
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if what == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif what == "link":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            else:
                info.size, info.mode = len(payload), 0o755 if what == "exe" else 0o644
                tar.addfile(info, io.BytesIO(payload))
    plain = raw.getvalue()
    return plain, gzip.compress(plain, mtime=0)


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def request(method, url, data=None, content_type=None):
    req = urllib.request.Request(url, method=method, data=data)
    if content_type:
        req.add_header("Content-Type", content_type)
    return urllib.request.urlopen(req, timeout=30)


def push_blob(base, data):
    d = digest(data)
    with request("POST", f"{base}/blobs/uploads/", b"") as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = base.split("/v2/")[0] + location
    sep = "&" if "?" in location else "?"
    with request("PUT", f"{location}{sep}digest={d}", data, "application/octet-stream"):
        pass
    return d


def main():
    host, repository, tag, kind = sys.argv[1:5]
    base = f"http://{host}/v2/{repository}"
    plain, packed = layer(kind)
    process = {
        "busybox": {"Cmd": ["/bin/sh"]},
        "pause": {"Entrypoint": ["/bin/sleep", "2147483647"]},
        "distroless": {"Cmd": ["/hello"]},
    }[kind]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], **process},
            "rootfs": {"type": "layers", "diff_ids": [digest(plain)]},
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": push_blob(base, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": push_blob(base, packed),
                    "size": len(packed),
                }
            ],
        },
        separators=(",", ":"),
    ).encode()
    with request("PUT", f"{base}/manifests/{tag}", manifest, "application/vnd.oci.image.manifest.v1+json"):
        pass
    print(digest(manifest))


if __name__ == "__main__":
    main()
