"""The paper's theory: the supplement's derivations checked in sympy and against autograd
(:mod:`.derivations`), its figures regenerated from the formulas (:mod:`.figures`), and the numbers the
paper reports, with their provenance (:mod:`.reported`)."""
