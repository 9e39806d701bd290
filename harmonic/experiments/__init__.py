"""The experiments: one run (:mod:`.run`), named grids of runs (:mod:`.sweeps`), the notebooks executed
with papermill (:mod:`.notebooks`), the report over run folders (:mod:`.report`), its figures
(:mod:`.figures`) and the README blocks they write (:mod:`.readme`)."""
