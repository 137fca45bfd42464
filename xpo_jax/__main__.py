from xpo_jax.cli import main

raise SystemExit(main())
