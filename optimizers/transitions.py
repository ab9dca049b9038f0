"""What happens to the subspace moments when the basis changes (spec projection-family.md
sections 2c, 4b and 5b). GaLore and APOLLO keep them as they are (no transition); FRUGAL resets
them (``reset_on_refresh``). A ``MomentTransition`` instead carries them into the new basis:

    M <- project_new(back_old(M))

and the second moment by ``second``: ``abs`` |project_new(back_old(V))| (DCT-AdamW's
``rotate_subspace``, where the basis change is a 0/1 matching of kept columns), ``sqrt``
(project_new(back_old(sqrt V)))^2 (COAP's ``restore_state``), ``keep`` (left as it is; Flora
has none). The back-projection forms one full-size temporary per moment, at refresh steps only.
"""

from __future__ import annotations

SECOND = ("abs", "sqrt", "keep")


class MomentTransition:
    def __init__(self, second: str = "abs", first_key: str = "exp_avg") -> None:
        if second not in SECOND:
            raise ValueError(f"second-moment transition {second!r}: use one of {SECOND}")
        self.second, self.first_key = second, first_key

    def apply(self, state: dict, old: dict, projector) -> None:
        """``old`` is the state before the refresh (its basis entries); ``state`` holds the new
        basis and the moments, still in the old coordinates."""
        if self.first_key in state:
            m = state[self.first_key]
            state[self.first_key] = projector.project(state, projector.project_back(old, m))
        if self.second == "keep" or "exp_avg_sq" not in state:
            return
        v = state["exp_avg_sq"]
        if self.second == "abs":
            state["exp_avg_sq"] = projector.project(state, projector.project_back(old, v)).abs_()
        else:
            back = projector.project_back(old, v.sqrt())
            state["exp_avg_sq"] = projector.project(state, back).square_()
