# Prepended to every probe module (they are run as text: in the kernel, in the trusted
# reference process and, for the judges, in the grading process). Judges see only JSON values.
import math as _math


def values(v):
    """The numbers of a JSON-encoded tensor/array, or the value itself."""
    return v["values"] if isinstance(v, dict) and "values" in v else v


def flat(v):
    v = values(v)
    if isinstance(v, list):
        return [x for item in v for x in flat(item)]
    return [v]


def shapes(v):
    """The shapes of the tensors/arrays in a JSON value, in order (lists of numbers have none)."""
    if isinstance(v, dict) and "values" in v:
        return [v.get("shape")]
    if isinstance(v, list):
        return [s for item in v for s in shapes(item)]
    if isinstance(v, dict):
        return [s for k in sorted(v) for s in shapes(v[k])]
    return []


def close(student, reference, rtol=1e-6, atol=1e-9):
    """(ok, message): every number within tolerance, same count, same tensor shapes."""
    if shapes(student) != shapes(reference):
        return False, f"returned tensors of shapes {str(shapes(student))[:80]}, expected {str(shapes(reference))[:80]}"
    a, b = flat(student), flat(reference)
    if not b:
        return (not a), "returned values where none were expected"
    if len(a) != len(b):
        return False, f"returned {len(a)} numbers where {len(b)} were expected"
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(y, (int, float)) and not isinstance(y, bool):
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not _math.isfinite(x) \
                    or abs(x - y) > atol + rtol * abs(y):
                return False, f"value {i}: got {str(x)[:20]}, expected {y:.6g}"
        elif x != y:
            return False, f"value {i}: got {str(x)[:40]}, expected {str(y)[:40]}"
    return True, ""


def equal(student, reference, seed=None):
    if student == reference:
        return True, ""
    return False, f"got {str(student)[:120]}, expected {str(reference)[:120]}"


def rng(seed, salt):
    import numpy as np
    return np.random.default_rng([int(seed), int(salt)])


def describe_inputs(probes, descriptions):
    """Attach to each probe, by check id, the sentence that feedback shows for what inputs it draws."""
    for check_id, text in descriptions.items():
        probes[check_id]["inputs"] = text
