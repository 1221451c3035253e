"""Flag forbidden shortcuts in an answer by reading its syntax tree, for the instructor to review.

Points never depend on these flags (the hidden probes decide them); a flag adds a ``REVIEW:``
note to the feedback and a ``review:`` line on the grader's stderr. Found from the tree, not
by grepping words, so ``__import__("built" + "ins")`` is still a call of ``__import__`` and a
word in a comment or a string is not a call:

* calling the library's implementation of the function being written (``forbidden``: the
  names and dotted paths each exercise's probe module lists), or importing ``pretrain_lib``;
* reaching for the machinery of the kernel or the grader: ``__import__``, ``importlib``,
  ``exec``/``eval``/``compile``, ``globals()``/``vars()``/``locals()``, ``setattr``/``delattr``,
  ``sys.modules``, ``builtins``, ``get_ipython`` (IPython events, ``%run``), ``__file__``,
  ``__dict__``, ``__code__``, ``__globals__``, ``inspect``;
* processes and threads: ``os.fork``/``setsid``/``system``/``exec*``/``spawn*``, ``subprocess``,
  ``multiprocessing``, ``threading``, ``ctypes``, ``signal``;
* replacing what checks rely on: redefining ``print``/``check``/``fmt``, assigning
  ``sys.stdout``, or assigning an attribute of an imported module (``np.allclose = ...``);
* code from other notebooks: ``nbformat``, ``runpy``, ``%run``, a string naming an ``.ipynb``
  file or the ``solutions`` folder.
"""
from __future__ import annotations

import ast

from .layout import parse

MACHINERY_CALLS = {"__import__", "exec", "eval", "compile", "globals", "vars", "locals", "setattr", "delattr",
                   "get_ipython", "breakpoint"}
MACHINERY_NAMES = {"__builtins__", "__file__", "__dict__", "__code__", "__globals__", "__loader__", "__spec__",
                   "__subclasses__", "__closure__", "f_globals", "f_locals", "f_back"}
MODULES = {"importlib": "imports modules by name", "builtins": "reaches the built-in functions",
           "inspect": "reads other code", "subprocess": "starts processes", "multiprocessing": "starts processes",
           "threading": "starts threads", "_thread": "starts threads", "ctypes": "calls native code",
           "signal": "handles signals", "nbformat": "reads notebooks", "runpy": "runs other files",
           "IPython": "reaches the kernel", "pretrain_lib": "imports the course library", "gc": "reaches live objects",
           "pickle": "loads code", "marshal": "loads code", "atexit": "runs code at exit", "socket": "opens sockets"}
OS_CALLS = {"fork", "forkpty", "setsid", "setpgid", "system", "popen", "kill", "killpg", "_exit", "execv", "execve",
            "execvp", "execl", "execlp", "spawnv", "spawnl", "posix_spawn", "posix_spawnp", "chdir"}
PROTECTED = {"print", "check", "fmt", "open", "input", "__import__"}
STRINGS = (".ipynb", "solutions/", "solutions\\", "/proc/", "results.jsonl")


def _root(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def review_source(source: str, *, forbidden: set[str] = frozenset(), modules: set[str] = frozenset()) -> list[str]:
    """Reasons to review this answer, one per kind, each with its line number ([] when clean).

    ``forbidden``: names or dotted paths of library implementations the answer must not use.
    ``modules``: names bound to modules in the notebook (``np``, ``torch``, ``F``…), whose
    attributes an answer must not replace.
    """
    tree = parse(source)
    if tree is None:
        return []
    found: dict[str, str] = {}

    def flag(key: str, node, text: str) -> None:
        found.setdefault(key, f"{text} (line {getattr(node, 'lineno', '?')})")

    module_names = set(modules) | {"sys", "os", "builtins", "np", "numpy", "torch", "F", "math", "scipy"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for a in node.names:
                module_names.add((a.asname or a.name).split(".")[0])
            for name in names:
                top = name.split(".")[0]
                if top in MODULES:
                    flag(f"import:{top}", node, f"imports `{name}`, which {MODULES[top]}")
                if name in forbidden or any(f"{name}.{a.name}" in forbidden for a in node.names):
                    flag("library", node, f"imports the library's implementation (`{name}`)")
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name in forbidden:
                        flag("library", node, f"imports the library's implementation `{a.name}`")
                    if node.module == "os" and a.name in OS_CALLS:
                        flag("os", node, f"imports `os.{a.name}`, which controls processes")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else None
            if name in MACHINERY_CALLS:
                flag(f"call:{name}", node, f"calls `{name}()`, which reaches the kernel's machinery")
            dotted = _dotted(fn)
            if dotted and dotted.split(".")[0] == "os" and dotted.split(".")[-1] in OS_CALLS:
                flag("os", node, f"calls `{dotted}()`, which controls processes")
        elif isinstance(node, ast.Name):
            if node.id in forbidden:
                flag("library", node, f"uses the library's implementation `{node.id}`")
            if node.id in MACHINERY_NAMES or node.id in MODULES and node.id in ("builtins", "importlib"):
                flag(f"name:{node.id}", node, f"uses `{node.id}`")
            if isinstance(node.ctx, ast.Store) and node.id in PROTECTED:
                flag(f"redefine:{node.id}", node, f"replaces `{node.id}`, which the checks use")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and (dotted in forbidden or any(dotted.endswith("." + f) for f in forbidden if "." in f)):
                flag("library", node, f"uses the library's implementation `{dotted}`")
            if node.attr in MACHINERY_NAMES:
                flag(f"name:{node.attr}", node, f"uses `.{node.attr}`")
            if dotted in ("sys.modules", "sys._getframe", "sys.settrace", "sys.setprofile", "sys.meta_path",
                          "sys.path_hooks"):
                flag(f"name:{dotted}", node, f"uses `{dotted}`")
            if isinstance(node.ctx, (ast.Store, ast.Del)) and _root(node) in module_names:
                flag("patch", node, f"replaces `{dotted or node.attr}`, an attribute of a module the checks use")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in PROTECTED:
            flag(f"redefine:{node.name}", node, f"redefines `{node.name}`, which the checks use")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for s in STRINGS:
                if s in node.value:
                    flag(f"string:{s}", node, f"names {s!r} (another notebook, the solutions or the grader's files)")
    return list(found.values())
