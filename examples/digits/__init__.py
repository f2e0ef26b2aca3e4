"""The digits example: scikit-learn's 8x8 handwritten digits, a small class-conditional teacher trained here
(`train_teacher.py`, shipped in assets/digits_teacher/), the classifier whose features score samples
(`train_classifier.py`, shipped in assets/digits_classifier/), a second, independently built judge
(`train_judge.py`, assets/digits_judge/), the training split as the GAN's real data (`make_real.py`,
assets/digits_real/), and the evaluation (`evaluate.py`). bench/digits_table.py and `make demo` drive it; the
engine knows nothing of it."""
