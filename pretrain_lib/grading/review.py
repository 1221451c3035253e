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
  file or the ``solutions`` folder;
* dynamic access that would hide any of the above: ``getattr`` (or ``operator.attrgetter``)
  with a computed name or a machinery name such as ``"modules"``, ``__dict__``/``vars()``,
  frame objects (``f_globals``, ``tb_frame``, ``sys._getframe``), a string naming a library
  implementation or ``pretrain_lib`` (``sys.modules["pretrain_lib..."]``), module aliases
  (``import sys as s; s.modules``).

IPython syntax is read as IPython runs it (``layout.parse`` applies IPython's transforms):
harmless magics (``%matplotlib inline``, ``%config``, ``%%time``) are never flagged, and the
Python inside ``%time``/``%%time``/``%%capture`` is reviewed like the rest of the answer; other
magics (``%run``, ``%%bash``, ``!shell``) are flagged.
"""
from __future__ import annotations

import ast

from .layout import parse

MACHINERY_CALLS = {"__import__", "exec", "eval", "compile", "globals", "vars", "locals", "setattr", "delattr",
                   "get_ipython", "breakpoint"}
MACHINERY_NAMES = {"__builtins__", "__file__", "__dict__", "__code__", "__globals__", "__loader__", "__spec__",
                   "__subclasses__", "__closure__", "f_globals", "f_locals", "f_back", "f_builtins", "f_code",
                   "tb_frame", "tb_next", "gi_frame", "cr_frame", "ag_frame", "__traceback__", "_getframe",
                   "__getattribute__", "__self__", "__mro__", "__bases__", "__base__", "__import__",
                   "__reduce_ex__", "__init_subclass__"}
MACHINERY_ATTRS = MACHINERY_NAMES | {"modules", "settrace", "setprofile", "meta_path", "path_hooks", "currentframe",
                                     "stack", "getouterframes", "system", "popen", "fork", "import_module"}
SAFE_MAGICS = {"matplotlib", "config", "precision", "pprint", "who", "whos", "who_ls", "pinfo", "pinfo2", "pdoc",
               "pdef", "psource", "autoreload", "aimport", "time", "timeit", "capture", "prun", "xmode", "notebook"}
BODY_MAGICS = {"time", "timeit", "capture", "prun"}       # run their argument or body as Python
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


def _magic(node) -> tuple[str, str, list] | None:
    """``("line"|"cell"|"shell", name, [python text])`` for ``get_ipython().run_line_magic(...)`` and kin."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    receiver = node.func.value
    if not (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
            and receiver.func.id == "get_ipython" and not receiver.args and not receiver.keywords):
        return None
    args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None for a in node.args]
    if node.func.attr in ("system", "getoutput"):
        return "shell", "!", []
    if node.func.attr == "run_line_magic" and len(args) >= 2 and args[0]:
        return "line", args[0], [args[1]] if args[0] in BODY_MAGICS else []
    if node.func.attr == "run_cell_magic" and len(args) >= 3 and args[0]:
        return "cell", args[0], [args[2]] if args[0] in BODY_MAGICS else []
    return None


def _resolve(dotted: str | None, aliases: dict[str, str]) -> str | None:
    if not dotted:
        return dotted
    head, _, rest = dotted.partition(".")
    return aliases[head] + ("." + rest if rest else "") if head in aliases else dotted


def review_source(source: str, *, forbidden: set[str] = frozenset(), modules: set[str] = frozenset(),
                  _depth: int = 0) -> list[str]:
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

    forbidden = set(forbidden)
    leaves = {f.rsplit(".", 1)[-1] for f in forbidden}
    module_names = set(modules) | {"sys", "os", "builtins", "np", "numpy", "torch", "F", "math", "scipy"}
    aliases: dict[str, str] = {}
    handled: set[int] = set()          # get_ipython() calls made by a harmless magic
    for node in ast.walk(tree):
        magic = _magic(node)
        if magic is None:
            continue
        kind, name, bodies = magic
        if kind == "shell":
            flag("magic:!", node, "runs a shell command (`!...`, `get_ipython().system`)")
        elif name not in SAFE_MAGICS:
            flag(f"magic:{name}", node, f"uses the magic `{'%' if kind == 'line' else '%%'}{name}` "
                                        f"(`get_ipython().run_{kind}_magic`), which reaches the kernel")
        else:
            handled.add(id(node.func.value))
        for body in bodies:
            if body and _depth < 5:
                for reason in review_source(body, forbidden=forbidden, modules=modules, _depth=_depth + 1):
                    found.setdefault(f"magic-body:{reason.split(' (line')[0]}",
                                     reason.replace("(line ", f"(in the `%{name}` on line {node.lineno}, line "))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for a in node.names:
                module_names.add((a.asname or a.name).split(".")[0])
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sys":
                for a in node.names:
                    if a.name in MACHINERY_ATTRS or a.name == "*":
                        flag(f"name:sys.{a.name}", node, f"imports `sys.{a.name}`, which reaches the interpreter")
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
            if name in MACHINERY_CALLS and id(node) not in handled:
                flag(f"call:{name}", node, f"calls `{name}()`, which reaches the kernel's machinery")
            resolved = _resolve(_dotted(fn), aliases) or ""
            if name in ("getattr", "hasattr", "delattr", "setattr") or resolved.split(".")[-1] in (
                    "attrgetter", "methodcaller", "__getattribute__", "getattr_static"):
                attr = node.args[1] if len(node.args) > 1 else (node.args[0] if resolved.endswith(
                    ("attrgetter", "methodcaller")) and node.args else None)
                if attr is not None and not (isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
                    flag("getattr", node, f"calls `{name or resolved}` with a computed attribute name, which can "
                                          "reach any attribute (a module, the library's implementation)")
                elif attr is not None and (attr.value.split(".")[-1] in MACHINERY_ATTRS):
                    flag(f"name:{attr.value}", node, f"reaches `{attr.value}` through `{name or resolved}`")
                elif attr is not None and attr.value.split(".")[-1] in leaves:
                    flag("library", node, f"reaches the library's implementation `{attr.value}` through "
                                          f"`{name or resolved}`")
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
            full = _resolve(dotted, aliases)
            for d in {dotted, full} - {None}:
                if d in forbidden or any(d.endswith("." + f) for f in forbidden if "." in f):
                    flag("library", node, f"uses the library's implementation `{dotted}`")
            if node.attr in leaves and isinstance(node.ctx, ast.Load):
                flag("library", node, f"uses `.{node.attr}`, the name of the library's implementation")
            if full and full.split(".")[0] == "pretrain_lib":
                flag("import:pretrain_lib", node, f"uses `{dotted}` from the course library")
            if node.attr in MACHINERY_NAMES:
                flag(f"name:{node.attr}", node, f"uses `.{node.attr}`")
            for d in {dotted, full} - {None}:
                if d in ("sys.modules", "sys._getframe", "sys.settrace", "sys.setprofile", "sys.meta_path",
                         "sys.path_hooks", "sys.exc_info", "sys.last_traceback"):
                    flag(f"name:{d}", node, f"uses `{d}`")
            if isinstance(node.ctx, (ast.Store, ast.Del)) and _root(node) in module_names:
                flag("patch", node, f"replaces `{dotted or node.attr}`, an attribute of a module the checks use")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in PROTECTED:
            flag(f"redefine:{node.name}", node, f"redefines `{node.name}`, which the checks use")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for s in STRINGS:
                if s in node.value:
                    flag(f"string:{s}", node, f"names {s!r} (another notebook, the solutions or the grader's files)")
            text = node.value.strip()
            if text.startswith("pretrain_lib") or text in forbidden or (text in leaves and text.isidentifier()):
                flag("string:library", node, f"names {text[:60]!r}, the course library or its implementation")
    return list(found.values())
