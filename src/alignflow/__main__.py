from alignflow.core.cli import main

raise SystemExit(main())
