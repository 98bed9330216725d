"""Operating a run: its set-up (`setup`), the calls of an epoch (`epoch_calls`), signals
(`stopping`), checkpoints, the workdir and its lock (`workdir`), what it reports and logs
(`reporting`, `logs`), the compilation cache, config validation, the command line (`cli`) and
its errors (`errors`).

May import anything below the loop (`steps`, `programs`, `optim`, `models`, `data`, `ops`,
`parallel`); `train` and the commands import it."""
