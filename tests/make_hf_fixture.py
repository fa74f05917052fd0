"""Write tests/fixtures/hf_logits.npz: HF transformers' logits for the cases of hf_reference.

Run with torch==2.13.0 and transformers installed:  python tests/make_hf_fixture.py
The fixture lets test_hf_crosscheck.py check our logits without torch.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import CASES, COLUMNS, hf_greedy, hf_logits  # noqa: E402

from refcomplete._paths import weights_dir  # noqa: E402
from refcomplete.checkpoint import write_random_checkpoint  # noqa: E402


def main():
    arrays = {"columns": COLUMNS}
    for name, (config, seed) in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            write_random_checkpoint(d, config, seed=seed)
            prefill, steps = hf_logits(d)
        full = np.concatenate([prefill, steps])
        arrays[f"{name}/logits"] = full[:, COLUMNS]
        arrays[f"{name}/argmax"] = full.argmax(axis=-1)
        print(name, full.shape)
    bundled = weights_dir() / "gpt2-tiny-shakespeare"
    prefill, steps = hf_logits(bundled)
    full = np.concatenate([prefill, steps])
    arrays["bundled/logits"] = full[:, COLUMNS]
    arrays["bundled/argmax"] = full.argmax(axis=-1)
    arrays["bundled/greedy"] = np.array(hf_greedy(bundled))
    out = Path(__file__).parent / "fixtures" / "hf_logits.npz"
    np.savez_compressed(out, **arrays)
    print("wrote", out)


if __name__ == "__main__":
    main()
