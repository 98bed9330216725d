"""Operating a run: its preparation (`prepare`: the config taken apart into what each part
needs, the state, the data on the device, the compiled programs), the calls of an epoch
(`epoch_calls`), signals (`stopping`), checkpoints, the workdir and its lock (`workdir`), what it
reports and logs (`reporting`, `logs`), the compilation cache, the C allocator, config
validation (`validation`, with the keys' move into groups) and the command line (`cli`).

May import anything below the loop (`steps`, `programs`, `budget`, `optim`, `models`, `data`,
`ops`, `parallel`, `errors`); `train` and the commands import it, and nothing below imports
it."""
