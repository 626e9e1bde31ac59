"""Execute every tutorial in place, keeping its outputs: on a Hopper GPU the GPU cells run too.

    python tutorials/run_all.py [NOTEBOOK ...]

Needs nbclient and ipykernel (the ``test`` extra). The committed notebooks' GPU cells were
executed this way on an H200, so readers without one see what they print there.
"""

import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).parent


def main(paths) -> int:
    for path in paths or sorted(HERE.glob("[0-9][0-9]_*.ipynb")):
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(notebook, path)
        print(f"{Path(path).name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
