from splitfed.cli import app

app(prog_name="splitfed")
