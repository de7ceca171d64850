from agent.boot import main

raise SystemExit(main())
