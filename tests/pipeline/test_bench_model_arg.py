"""`papa bench --model-arg` takes KEY=VALUE: an argument without "=" or without a key is refused by the parser, exit
status 2, naming what it found, before anything runs."""

import pytest

from papa.cli import main


@pytest.mark.parametrize("text", ["width", "=16", ""])
def test_a_model_argument_that_is_not_key_value_is_refused(text, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", "digits_cnn", "--model-arg", text])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert err.splitlines()[-1] == f"papa bench: error: argument --model-arg: expected KEY=VALUE, found {text!r}"
