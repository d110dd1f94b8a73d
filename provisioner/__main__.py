from provisioner.cli import app

app()
