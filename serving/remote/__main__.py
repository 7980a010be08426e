"""`python -m serving.remote --address PATH`: the engine process (the server starts it)."""

from serving.remote.host import main

main()
