"""A Google Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator (JSON API,
in memory), started in its own process.

    with GcsEmulator() as emulator:            # a free port, one bucket: emulator.bucket
        subprocess.run(..., env={**os.environ, **emulator.env})

`env` holds what any user of an emulator sets and nothing else: STORAGE_EMULATOR_HOST (gcsfs,
etils.epath, google-cloud-storage), TENSORSTORE_GCS_HTTP_URL (tensorstore, Orbax's array store)
and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs's documented switch for its bucket-type
probe, a gRPC call no emulator serves).

One conformance fix, applied in the emulator's process: real GCS names the object generation
of every media download in an `x-goog-generation` header, and the emulator leaves it out.
tensorstore then records generation 0 and rejects its own next conditional read of the object
("Malformed StorageGeneration"); Orbax re-reads OCDBT manifests that way.

    python -m tests.gcs_emulator --port 9023 [--bucket NAME]   # serve until killed
"""
import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(port: int, bucket: str) -> None:
    from http import HTTPStatus

    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download
    # The server module builds its routing table when imported: after the fix above.
    from gcp_storage_emulator.server import create_server
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print(f"serving gs://{bucket} on 127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """The emulator in a subprocess on a free port; a context manager."""

    def __init__(self, bucket: str = "mta-test", log_path: str = os.devnull):
        # tensorstore accepts only valid GCS bucket names (3 to 63 characters).
        self.bucket, self.port, self.log_path = bucket, free_port(), log_path
        url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._proc = None

    def start(self, timeout: float = 60.0) -> "GcsEmulator":
        log = open(self.log_path, "w")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gcs_emulator", f"--port={self.port}",
             f"--bucket={self.bucket}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self._proc.poll() is None, f"the GCS emulator exited; see {self.log_path}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the GCS emulator did not listen on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default="mta-test")
    args = parser.parse_args()
    _serve(args.port, args.bucket)
