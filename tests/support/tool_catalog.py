"""A big, realistic catalog for tool search: hand-written tools (the answers) hidden among
generated ones that share their vocabulary, and natural-language queries with the tool each means.

The generated tools are the ``verb × resource × region`` of an enterprise API estate
(``export_stock_levels_emea``: "Export stock levels in the EMEA inventory system"), so words such as
stock, weather, email, currency, price or calendar occur in hundreds of names besides the one tool
a query is after. Queries are written the way a person asks, not with the tool's name.

    python -c "from tests.support.tool_catalog import write_catalog; ..."   # used by bench/tool_search.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAYMENT = {
    "network": "eip155:31337",
    "asset": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    "asset_name": "USD Coin",
    "asset_version": "2",
    "decimals": 6,
    "pay_to": "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
    "max_timeout_seconds": 120,
}


def _p(description: str, kind: str = "string") -> dict[str, Any]:
    return {"type": kind, "description": description}


# name: (description, {parameter: schema})
ANSWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "get_current_weather": ("Current weather conditions for a city: temperature, wind speed, rain and snow.",
                            {"city": _p("City name")}),
    "get_weather_forecast": ("Weather forecast for a city for the coming week: daily highs, lows and chance of rain.",
                             {"city": _p("City name"), "days": _p("Number of days, 1 to 7", "integer")}),
    "get_stock_quote": ("Latest trading price of a listed company's shares, by ticker symbol.",
                        {"symbol": _p("Ticker symbol, e.g. AAPL")}),
    "get_stock_history": ("Daily open, high, low and closing prices of a share over a range of dates.",
                          {"symbol": _p("Ticker symbol"), "start": _p("First date"), "end": _p("Last date")}),
    "convert_currency": ("Convert an amount of money from one currency to another at the current exchange rate.",
                         {"amount": _p("Amount to convert", "number"),
                          "from": _p("ISO code of the currency to convert from, e.g. USD for US dollars"),
                          "to": _p("ISO code of the currency to convert to, e.g. EUR for euros")}),
    "send_sms": ("Send a text message to a mobile phone number.",
                 {"to": _p("Phone number in international format"), "message": _p("Text to send")}),
    "send_email": ("Send an email with a subject and body to one or more recipients.",
                   {"to": _p("Recipient addresses"), "subject": _p("Subject line"), "body": _p("Message body")}),
    "translate_text": ("Translate text between languages; the source language is detected automatically.",
                       {"text": _p("Text to translate"),
                        "target": _p("Language to translate into, e.g. Japanese, French, Spanish")}),
    "geocode_address": ("Map coordinates (latitude and longitude) of a street address, landmark or place name.",
                        {"address": _p("Address or place name")}),
    "reverse_geocode": ("Nearest street address for a GPS position given as latitude and longitude.",
                        {"lat": _p("Latitude", "number"), "lon": _p("Longitude", "number")}),
    "track_package": ("Where a parcel is now: the carrier's tracking status and estimated delivery date.",
                      {"tracking_number": _p("Carrier tracking number")}),
    "create_calendar_event": ("Schedule a meeting or appointment in a calendar at a given date and time.",
                              {"title": _p("Event title"), "start": _p("Start time"), "attendees": _p("Who to invite")}),
    "search_flights": ("Find flights and plane tickets between two airports on a date, with fares and stops.",
                       {"origin": _p("Departure airport code"), "destination": _p("Arrival airport code"),
                        "date": _p("Travel date")}),
    "book_hotel": ("Reserve a hotel room for a number of nights, from check-in to check-out date.",
                   {"city": _p("City"), "check_in": _p("Arrival date"), "nights": _p("Nights", "integer")}),
    "summarize_document": ("A short summary of a long text, article or document.",
                           {"text": _p("The text to summarize")}),
    "detect_language": ("Which language a piece of text is written in, with a confidence score.",
                        {"text": _p("Text to examine")}),
    "get_crypto_price": ("Current price of a cryptocurrency such as Bitcoin or Ether, in US dollars.",
                         {"coin": _p("Coin symbol, e.g. BTC")}),
    "calculate_mortgage": ("Monthly repayment of a home loan from the amount borrowed, interest rate and term.",
                           {"principal": _p("Amount borrowed", "number"), "rate": _p("Yearly interest rate", "number"),
                            "years": _p("Term in years", "integer")}),
    "check_domain_availability": ("Whether an internet domain name is still free to register.",
                                  {"domain": _p("Domain name, e.g. example.com")}),
    "get_air_quality": ("Air pollution index and particulate levels (PM2.5, ozone) for a city.",
                        {"city": _p("City name")}),
    "lookup_company": ("Company registration details: legal name, registered address, officers and directors.",
                       {"name": _p("Company name or registration number")}),
    "validate_iban": ("Check that an international bank account number (IBAN) is well formed.",
                      {"iban": _p("The IBAN")}),
    "get_sunrise_sunset": ("Sunrise and sunset times: when the sun rises and sets at a place on a date.",
                           {"place": _p("Place name"), "date": _p("Date")}),
    "transcribe_audio": ("Speech to text: the words spoken in an audio or voice recording.",
                         {"url": _p("URL of the recording")}),
    "get_nutrition_facts": ("Calories, protein, fat and carbohydrates in a food or dish.",
                            {"food": _p("Food or dish name")}),
    "get_public_holidays": ("Public holidays of a country in a given year.",
                            {"country": _p("Country code"), "year": _p("Year", "integer")}),
}

# (query in natural words, the tool it means)
QUERIES: list[tuple[str, str]] = [
    ("is it raining in Oslo right now", "get_current_weather"),
    ("what will the weather be like next week in Paris", "get_weather_forecast"),
    ("how much is Apple stock trading at", "get_stock_quote"),
    ("closing prices of a share over the last month", "get_stock_history"),
    ("how many euros is 100 dollars at today's rate", "convert_currency"),
    ("text my phone a reminder", "send_sms"),
    ("email my manager that I am running late", "send_email"),
    ("how do I say good morning in Japanese", "translate_text"),
    ("map coordinates of a landmark like the Eiffel Tower", "geocode_address"),
    ("which street is at this GPS position", "reverse_geocode"),
    ("where is my parcel", "track_package"),
    ("schedule a meeting with Bob on Friday at 3pm", "create_calendar_event"),
    ("cheap plane tickets from London to New York", "search_flights"),
    ("I need a room to stay in Rome for two nights", "book_hotel"),
    ("make a short summary of this article", "summarize_document"),
    ("what language is this sentence written in", "detect_language"),
    ("how much is bitcoin worth today", "get_crypto_price"),
    ("monthly payment on a 300k house loan", "calculate_mortgage"),
    ("is example.com available to register", "check_domain_availability"),
    ("how polluted is the air in Delhi", "get_air_quality"),
    ("who are the directors of Acme Ltd", "lookup_company"),
    ("is this bank account number valid", "validate_iban"),
    ("when does the sun rise in Reykjavik tomorrow", "get_sunrise_sunset"),
    ("turn this voice recording into text", "transcribe_audio"),
    ("how many calories in a banana", "get_nutrition_facts"),
    ("is next Monday a public holiday in the UK", "get_public_holidays"),
]

VERBS = ["list", "get", "create", "update", "delete", "export", "import", "archive", "sync", "count"]
RESOURCES = [
    "invoices", "customers", "orders", "shipments", "tickets", "users", "products", "payments", "refunds",
    "subscriptions", "warehouses", "suppliers", "employees", "contracts", "leads", "campaigns", "reports",
    "documents", "devices", "sensors", "accounts", "projects", "tasks", "assets", "vehicles", "stock_levels",
    "weather_stations", "currency_codes", "price_lists", "email_templates", "sms_logs", "calendar_feeds",
    "language_packs", "flight_crews", "hotel_partners", "audio_files", "company_records", "bank_transfers",
    "domain_records", "holiday_rosters", "loan_applications", "delivery_routes", "map_layers", "text_snippets",
    "phone_lines", "share_registers", "coin_wallets", "food_suppliers", "air_filters", "event_logs",
]
REGIONS = [
    "emea", "apac", "amer", "eu", "us", "uk", "de", "fr", "jp", "br", "in", "au",
    "internal", "legacy", "partner", "sandbox", "staging", "archive", "retail", "wholesale",
]
SYSTEMS = ["ERP", "CRM", "billing", "logistics", "inventory", "support", "HR", "reporting"]
VERB_TEXT = {
    "list": "List", "get": "Get one of the", "create": "Create", "update": "Update", "delete": "Delete",
    "export": "Export", "import": "Import", "archive": "Archive", "sync": "Synchronize", "count": "Count",
}


def filler_tools(count: int) -> list[dict[str, Any]]:
    """``count`` generated tools (at most 10,000), names unique."""
    tools: list[dict[str, Any]] = []
    for index in range(count):
        verb = VERBS[index % len(VERBS)]
        resource = RESOURCES[(index // len(VERBS)) % len(RESOURCES)]
        region = REGIONS[(index // (len(VERBS) * len(RESOURCES))) % len(REGIONS)]
        system = SYSTEMS[index % len(SYSTEMS)]
        label = resource.replace("_", " ")
        tools.append(_tool(
            f"{verb}_{resource}_{region}", f"/f{index}/{resource}",
            f"{VERB_TEXT[verb]} {label} in the {region.upper()} {system} system. Results are paged.",
            {
                "status": _p(f"Only {label} with this status"),
                "updated_since": _p("Only records changed after this date"),
                "page": _p("Page number", "integer"),
            },
        ))
    return tools


def _tool(name: str, path: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "method": "GET",
        "path": path,
        "upstream": "legacy",
        "upstream_path": "/api/v1/quote/AAPL",
        "price": "0.002",
        "input_schema": {"type": "object", "properties": parameters, "additionalProperties": False},
    }


def catalog_tools(total: int = 10_000) -> list[dict[str, Any]]:
    """The answers spread evenly through ``total - len(ANSWERS)`` generated tools."""
    answers = [_tool(name, f"/api/{name}", description, parameters)
               for name, (description, parameters) in ANSWERS.items()]
    fillers = filler_tools(total - len(answers))
    step = max(1, len(fillers) // len(answers))
    tools: list[dict[str, Any]] = []
    for index, filler in enumerate(fillers):
        if index % step == 0 and answers:
            tools.append(answers.pop(0))
        tools.append(filler)
    return tools + answers


def write_catalog(path: Path, total: int = 10_000, upstream: str = "http://127.0.0.1:9101") -> Path:
    """A catalog file of ``total`` tools (JSON, which the YAML loader reads)."""
    document = {
        "catalog": 1,
        "owner": "search-test",
        "description": "generated catalog for tool search",
        "payment": PAYMENT,
        "upstreams": {"legacy": {"base_url": upstream, "timeout_seconds": 10}},
        "tools": catalog_tools(total),
    }
    path.write_text(json.dumps(document, indent=1))
    return path
