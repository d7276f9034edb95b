"""The `biovis` command's families of sub-commands, one module each (`models`, `serve`, `bench`, `segment`, `drift`,
`pipeline`, `keras`), each with `add_commands(sub)`; `core` holds what they share. `biovis.cli` assembles them."""
