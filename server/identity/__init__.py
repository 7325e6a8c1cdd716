"""Identity and access: organizations, users, roles, API keys, tokens, MFA and RBAC."""
