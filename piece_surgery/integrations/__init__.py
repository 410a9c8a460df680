"""The library inside other training loops: score a loaded model, make only its masked entries
trainable (`sparsify`), train with any loop (Hugging Face Trainer, TRL's SFTTrainer, accelerate, a
plain PyTorch loop) and save the same delta `train` writes."""
