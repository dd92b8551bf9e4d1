"""Expert-aware scheduling (paper §4, Algorithm 1). Arrives with its issue;
the model already keeps each step's routes where a scheduler can read them."""
