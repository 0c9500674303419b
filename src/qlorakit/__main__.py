from qlorakit.cli import main

raise SystemExit(main())
