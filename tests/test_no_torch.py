"""`import lensjax`, load, forward and generate work with torch absent (its import is blocked)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, Block())
    import numpy as np
    import lensjax
    m = lensjax.load(sys.argv[1])
    ids = np.arange(3, 11)[None]
    logits = lensjax.forward(m.config, m.params, ids)
    out = lensjax.generate(m.config, m.params, ids, max_new_tokens=4)
    assert "torch" not in sys.modules
    print("OK", logits.shape, out.shape)
    """
)


def test_library_runs_without_torch(tmp_path):
    from tiny_hf import make

    make("gpt2", tmp_path / "m")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
