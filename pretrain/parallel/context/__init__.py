"""Context parallelism: one sequence split over the ``cp`` ranks of the mesh (zigzag.py), its
attention computed by a ring of K/V blocks (ring.py) or by an all-to-all between sequence and
head shards (ulysses.py), plugged into the model's attention layers from outside (apply.py)."""
