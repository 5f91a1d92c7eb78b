"""The ``drspot`` commands by group; each module registers its own arguments beside its handlers (:func:`register`)."""
