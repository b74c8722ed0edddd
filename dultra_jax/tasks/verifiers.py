"""The verifier pools a task's scorer uses, opened on first use and kept across calls (one per run)."""

from __future__ import annotations


class Verifiers:
    """``math`` (math-verify in worker processes) and ``code`` (the sandbox), built when first asked for.

    The reward context (:class:`dultra_jax.rewards.registry.RewardContext`) has the same two attributes, so a
    task's scorer runs on either."""

    def __init__(self, *, workers: int | None = None, math_mode: str = "eval", math_timeout_s: float = 10.0,
                 code_timeout_s: float | None = None):
        self.workers, self.math_mode, self.math_timeout_s = workers, math_mode, math_timeout_s
        self.code_timeout_s = code_timeout_s
        self._math = None
        self._code = None

    @property
    def math(self):
        if self._math is None:
            from dultra_jax.rewards.procpool import MathVerifier

            self._math = MathVerifier(workers=self.workers, timeout_s=self.math_timeout_s, mode=self.math_mode)
        return self._math

    @property
    def code(self):
        if self._code is None:
            from dultra_jax.rewards.code import APPS_TIMEOUT_S, HARNESS_TIMEOUT_S, CodeVerifier

            t = self.code_timeout_s
            self._code = CodeVerifier(workers=self.workers, harness_timeout_s=t or HARNESS_TIMEOUT_S,
                                      apps_timeout_s=t or APPS_TIMEOUT_S)
        return self._code

    def close(self) -> None:
        for pool in (self._math, self._code):
            if pool is not None and hasattr(pool, "close"):
                pool.close()
        self._math = self._code = None

    def __enter__(self) -> Verifiers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
