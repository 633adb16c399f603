"""What a run trains: the training terms and the evaluation NLL of each objective."""
