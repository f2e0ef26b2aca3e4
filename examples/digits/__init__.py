"""The digits example: scikit-learn's 8x8 handwritten digits, a small class-conditional teacher trained here
(`train_teacher.py`, shipped in assets/digits_teacher/), the classifier whose features score samples
(`train_classifier.py`, shipped in assets/digits_classifier/), and the evaluation (`evaluate.py`).
bench/digits_table.py and `make demo` drive it; the engine knows nothing of it."""
