"""The one error `hsiedge infer` raises for a run that cannot start or finish."""


class InferError(RuntimeError):
    """Inference cannot start or finish; one sentence says why."""
