"""checkpoint.py, weight_quant.py and the checkpoint scripts as a user meets them when something is off: an import
cycle, an interrupted or killed conversion, a model_args.json that does not belong to its model.pth, a gpt-fast
model.pth, a chat template kept only in chat_template.jinja. Each failure is one line, exit status non-zero, and
nothing is written or lost."""
import ast
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PY = sys.executable


def module_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
    return found


def test_checkpoint_and_weight_quant_import_no_cycle():
    """weight_quant.py sits below checkpoint.py: it never imports checkpoint, and checkpoint imports it once, at the
    top (no function-level import of one by the other)."""
    assert not [name for name, _ in module_imports(REPO_DIR / "weight_quant.py") if name == "checkpoint"]
    from_checkpoint = [top for name, top in module_imports(REPO_DIR / "checkpoint.py") if name == "weight_quant"]
    assert from_checkpoint and all(from_checkpoint)
    # Either imports alone, and checkpoint still offers the marker helpers that scripts import from it.
    out = subprocess.run([PY, "-c", "import weight_quant, sys; assert 'checkpoint' not in sys.modules; "
                          "import checkpoint; assert checkpoint.weight_quantization is weight_quant.weight_quantization; "
                          "assert checkpoint.WEIGHT_QUANTIZATION_FILE == 'weight_quantization.json'"],
                         cwd=REPO_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
