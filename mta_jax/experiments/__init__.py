"""Studies built on train.train_and_evaluate: `compare` runs FFN variants over seeds."""
