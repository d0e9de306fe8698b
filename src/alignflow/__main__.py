from alignflow.cli import main

raise SystemExit(main())
